"""QuaRot: the rotation alone leaves the full-precision model unchanged; quantized models save and reload."""
import copy

import pytest
import torch
from conftest import tiny_model

from duquant import QuantConfig, quantize
from duquant.checkpoint import load_quantized, save_quantized
from duquant.methods.quarot_rotation import residual_rotation


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def rotate_only(model, **kwargs):
    """QuaRot with every bit-width at 16: only the rotations act."""
    quantize(model, QuantConfig(method="quarot", wbits=16, abits=16, **kwargs), None, device="cpu", progress=False)
    return model


@pytest.mark.parametrize("rotation", ["hadamard", "random"])
def test_rotation_keeps_the_fp_model(family, tokens, rotation):
    """Computational invariance: norms folded, residual rotated, V and down_proj Hadamards, Q/K Hadamard."""
    model = tiny_model(family)
    ref = logits(model, tokens)
    embed_before = model.model.embed_tokens.weight.detach().clone()
    rotate_only(model, rotation=rotation)
    assert torch.allclose(logits(model, tokens), ref, atol=2e-5, rtol=1e-4)
    # ... and the model really was transformed.
    assert not torch.allclose(model.model.embed_tokens.weight, embed_before, atol=1e-3)
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert layer.mlp.down_proj.input_transform.hadamard and layer.self_attn.q_proj.input_transform is None
    assert layer.self_attn.qkv_quantizer.qk_hadamard
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.config.tie_word_embeddings


def test_each_rotation_step_matters(tokens):
    """The invariance test can fail: dropping the online down_proj Hadamard breaks the model."""
    model = rotate_only(tiny_model("qwen2"))
    ref = logits(tiny_model("qwen2"), tokens)
    model.model.layers[1].mlp.down_proj.input_transform.hadamard = False
    assert not torch.allclose(logits(model, tokens), ref, atol=1e-2)


def test_rotation_is_seeded():
    config = QuantConfig(method="quarot", seed=5)
    q = residual_rotation(64, config)
    assert torch.allclose(q @ q.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, residual_rotation(64, config))
    assert not torch.equal(q, residual_rotation(64, QuantConfig(method="quarot", seed=6)))
    assert not torch.equal(q, residual_rotation(64, QuantConfig(method="quarot", seed=5, rotation="random")))


def test_quarot_w8a8_beats_rtn_on_outlier_channels(tokens):
    """With outlier channels in the norm outputs, rotating them away must help."""
    base = tiny_model("llama")
    with torch.no_grad():  # conftest's outlier channels, four times stronger
        for layer in base.model.layers:
            layer.input_layernorm.weight[3] *= 4
            layer.post_attention_layernorm.weight[7] *= 4
    ref = logits(base, tokens)
    errors = {}
    for method in ("rtn", "quarot"):
        model = copy.deepcopy(base)
        config = QuantConfig(method=method, wbits=8, abits=8, qkv_bits=16, w_clip=1.0, a_clip=1.0)
        quantize(model, config, None, device="cpu", progress=False)
        errors[method] = float((logits(model, tokens) - ref).norm() / ref.norm())
    assert errors["quarot"] < 0.6 * errors["rtn"], errors


def test_quarot_gptq_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        quantize(tiny_model("llama"), QuantConfig(method="quarot", weight_quantizer="gptq"), None, device="cpu",
                 progress=False)


def test_save_and_reload_quarot(tmp_path, tokens):
    """Untied embeddings and the online Hadamard layout survive a save/load round trip."""
    model = tiny_model("llama-tied")
    config = QuantConfig.from_preset("quarot", method="quarot")  # GPTQ, KV4
    quantize(model, config, tokens, device="cpu", batch_size=2, progress=False)
    expected = logits(model, tokens)
    out = save_quantized(model, None, tmp_path / "q", config)
    loaded, loaded_config, _ = load_quantized(out)
    assert loaded_config == config
    assert loaded.model.layers[1].mlp.down_proj.input_transform.hadamard
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded, tokens), expected)


@pytest.mark.slow
def test_rotation_keeps_smollm2(smollm2_copy):
    """Real sizes: hidden 576 = 9·64 and intermediate 1536 = 12·128 need Kronecker Hadamards."""
    model, tokenizer = smollm2_copy
    tokens = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    ref = logits(model, tokens)
    rotate_only(model)
    out = logits(model, tokens)
    assert (out - ref).abs().max() < 2e-3 * ref.abs().max()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
