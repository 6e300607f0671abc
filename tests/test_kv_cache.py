"""The quantized KV cache holds codes, and decoding with it matches the fake-quant full forward."""
import pytest
import torch
from conftest import tiny_model

from duquant import QuantConfig, quantize
from duquant.modeling.kv_cache import QuantizedKVCache, has_quantized_kv

# Linears in 16 bit, so that only the attention operands are quantized: with 4-bit activations
# the differently shaped matmuls of incremental decoding flip an occasional rounding there.
SETTINGS = {
    "quarot-kv4": dict(method="quarot", wbits=16, abits=16, kv_bits=4, quantize_q=False, kv_symmetric=False,
                       qk_clip=0.95, v_clip=0.95),
    "duquant-qkv4": dict(method="duquant", wbits=16, abits=16, qkv_bits=4, rotation_steps=8),  # asymmetric
}


def incremental_logits(model, tokens, prefill: int, cache):
    with torch.no_grad():
        steps = [model(input_ids=tokens[:, :prefill], past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, tokens.shape[1]):
            steps.append(model(input_ids=tokens[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_cached_decoding_matches_full_forward(family, tokens, setting):
    model = tiny_model(family)
    quantize(model, QuantConfig(**SETTINGS[setting]), tokens, device="cpu", batch_size=2, progress=False)
    with torch.no_grad():
        full = model(input_ids=tokens, use_cache=False).logits  # the perplexity path: fake-quant K/V
    cache = QuantizedKVCache(model)
    steps = incremental_logits(model, tokens, 7, cache)  # 24 tokens: past mistral's sliding window of 16
    assert torch.allclose(steps, full, atol=1e-5, rtol=1e-5)
    layer = cache.layers[0]
    codes = layer.stored_keys.parts[0]
    assert codes.dtype == torch.uint8 and codes.shape[-2] == tokens.shape[1]
    assert codes.shape[-1] * 2 == model.config.hidden_size // model.config.num_attention_heads  # nibbles


def test_cache_holds_what_the_fake_quant_path_computes(tokens):
    """The stored K equals quant(Hadamard(K)) computed from a full-precision cache."""
    from transformers import DynamicCache

    from duquant.quant.quantizer import fake_quantize
    from duquant.transforms.hadamard import apply_hadamard

    model = tiny_model("llama")
    quantize(model, QuantConfig(**SETTINGS["quarot-kv4"]), None, device="cpu", progress=False)
    plain, quantized = DynamicCache(config=model.config), QuantizedKVCache(model)
    with torch.no_grad():
        model(input_ids=tokens[:1], past_key_values=plain, use_cache=True)
        model(input_ids=tokens[:1], past_key_values=quantized, use_cache=True)
    spec = model.model.layers[1].self_attn.qkv_quantizer.k_spec
    expected = fake_quantize(apply_hadamard(plain.layers[1].keys), spec)
    assert torch.allclose(quantized.layers[1].stored_keys.read(torch.float32), expected, atol=1e-6)
    assert quantized.nbytes() < plain.layers[1].keys.numel() * 4 * 2 * len(plain.layers) / 2


def test_generate_with_quantized_cache(tokens):
    model = tiny_model("qwen2")
    quantize(model, QuantConfig.from_preset("quarot", method="quarot", weight_quantizer="rtn"), None, device="cpu",
             progress=False)  # W4A4KV4
    assert has_quantized_kv(model)
    prompt = tokens[:1, :6]
    cache = QuantizedKVCache(model)
    out = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is never fed back
    with torch.no_grad():  # greedy tokens agree with the full-sequence (perplexity) forward
        full = model(input_ids=out, use_cache=False).logits
    assert torch.equal(full[0, 5:-1].argmax(-1), out[0, 6:])


def test_16_bit_kv_needs_no_quantized_cache(tokens):
    model = tiny_model("llama")
    quantize(model, QuantConfig(method="rtn", abits=16), None, device="cpu", progress=False)
    assert not has_quantized_kv(model)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_static_cache_decodes_like_the_growing_one(family, tokens, setting):
    """StaticQuantizedKVCache (fixed buffers, for CUDA graphs) gives QuantizedKVCache's logits
    step by step, and holds codes for all its positions."""
    from duquant.modeling.kv_cache import StaticQuantizedKVCache

    model = tiny_model(family)
    quantize(model, QuantConfig(**SETTINGS[setting]), tokens, device="cpu", batch_size=2, progress=False)
    growing = incremental_logits(model, tokens, 7, QuantizedKVCache(model))
    static = StaticQuantizedKVCache(model, max_cache_len=tokens.shape[1] + 5)
    steps = incremental_logits(model, tokens, 7, static)
    assert torch.allclose(steps, growing, atol=1e-5, rtol=1e-5)
    layer = static.layers[0]
    assert int(layer.cumulative_length) == tokens.shape[1]
    codes = layer.key_parts[0]
    assert codes.dtype == torch.uint8 and codes.shape[-2] == tokens.shape[1] + 5
    assert not codes[:, :, tokens.shape[1]:].any()  # the positions not written yet stay zero
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert static.nbytes() < 2 * len(static.layers) * codes.shape[0] * codes.shape[1] * codes.shape[2] * head_dim * 4


def test_greedy_generate_with_quantized_kv_matches_generate(tokens):
    """graph_generate's loop on a W4A4KV4 model (static code cache) gives the tokens of
    `model.generate` with QuantizedKVCache."""
    from duquant.modeling.graph_generate import greedy_generate

    model = tiny_model("qwen2")
    quantize(model, QuantConfig.from_preset("quarot", method="quarot", weight_quantizer="rtn"), None, device="cpu",
             progress=False)
    prompt = tokens[:2, :6]
    want = model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
                          past_key_values=QuantizedKVCache(model))
    got = greedy_generate(model, prompt, 10)
    assert torch.equal(got.ids, want)
