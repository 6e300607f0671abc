"""End-to-end behaviour on tiny random models of every supported family."""
import copy

import pytest
import torch
from conftest import tiny_config, tiny_model

from duquant import QuantConfig, quantize
from duquant.modeling.adapters import UnsupportedModelError
from duquant.modeling.qlinear import QuantLinear


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def run(model, tokens, **kwargs):
    quantize(model, QuantConfig(**kwargs), tokens, device="cpu", batch_size=2, progress=False)
    return model


@pytest.mark.parametrize("method", ["smoothquant", "duquant"])
def test_transforms_alone_leave_the_model_unchanged(family, tokens, method):
    """With 16-bit weights and activations, smoothing + rotations + permutation are exact.

    This checks every fold in the real model: norms, v_proj rows under GQA, up_proj rows,
    q/k/v biases (Qwen2), tied embeddings.
    """
    model = tiny_model(family)
    ref = logits(model, tokens)
    run(model, tokens, method=method, wbits=16, abits=16, rotation_steps=16)
    assert any(isinstance(m, QuantLinear) and m.input_transform is not None for m in model.modules()) == (
        method == "duquant"
    )
    assert torch.allclose(logits(model, tokens), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "duquant"])
def test_w8a8_is_close_and_w4a4_is_not_broken(family, tokens, method):
    model = tiny_model(family)
    ref = logits(model, tokens)
    out8 = logits(run(copy.deepcopy(model), tokens, method=method, wbits=8, abits=8, w_clip=1.0, a_clip=1.0,
                         qk_clip=1.0, rotation_steps=16), tokens)
    out4 = logits(run(copy.deepcopy(model), tokens, method=method, rotation_steps=16), tokens)
    rel8 = (out8 - ref).norm() / ref.norm()
    rel4 = (out4 - ref).norm() / ref.norm()
    assert rel8 < 0.05
    assert torch.isfinite(out4).all() and rel8 < rel4


def test_batch_of_two_equals_two_batches_of_one(family, tokens):
    model = run(tiny_model(family), tokens, method="duquant", rotation_steps=16)
    pair = logits(model, tokens[:2])
    singles = torch.cat([logits(model, tokens[i : i + 1]) for i in range(2)])
    assert torch.allclose(pair, singles, atol=1e-5, rtol=1e-5)


def test_weights_are_real_integer_codes(tokens):
    model = run(tiny_model("llama"), tokens, method="duquant", rotation_steps=8)
    lin = model.model.layers[0].mlp.down_proj
    assert lin.qweight.dtype == torch.uint8 and lin.qweight.shape == (64, 48)  # 96 inputs, two per byte
    codes = lin.weight_codes()
    assert int(codes.max()) <= 15
    assert lin.input_transform.rot1.shape == (32, 32)  # 96 channels: largest power of two dividing is 32


def test_same_seed_same_model_other_seed_differs(tokens):
    a = run(tiny_model("llama"), tokens, method="duquant", rotation_steps=8, seed=3)
    b = run(tiny_model("llama"), tokens, method="duquant", rotation_steps=8, seed=3)
    c = run(tiny_model("llama"), tokens, method="duquant", rotation_steps=8, seed=4)
    rot = lambda m: m.model.layers[1].self_attn.q_proj.input_transform.rot1  # noqa: E731
    assert torch.equal(rot(a), rot(b)) and not torch.equal(rot(a), rot(c))
    assert torch.equal(logits(a, tokens), logits(b, tokens))


def test_weight_only_w4a16_keeps_activations(tokens):
    model = run(tiny_model("llama"), tokens, method="rtn", abits=16)
    lin = model.model.layers[0].self_attn.q_proj
    assert lin.act_spec is None and lin.weight_spec.bits == 4
    assert model.model.layers[0].self_attn.qkv_quantizer.k_spec is None


def test_explicit_block_size_that_does_not_divide_is_refused(tokens):
    with pytest.raises(ValueError, match="does not divide"):
        run(tiny_model("llama"), tokens, method="duquant", block_size=128)


def test_nan_during_calibration_names_the_layer(tokens):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="layer 1"):
        run(model, tokens, method="duquant", rotation_steps=4)


def test_unsupported_architecture_lists_supported(tokens):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        run(model, tokens, method="rtn")


def test_methods_without_calibration_refused():
    with pytest.raises(ValueError, match="calibration"):
        quantize(tiny_model("llama"), QuantConfig(method="duquant"), None, device="cpu", progress=False)


def test_config_round_trip_and_validation():
    config = QuantConfig(method="smoothquant", wbits=6, abits=6, block_size=64, exchange="row")
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert config.alpha == 0.5 and QuantConfig().alpha == 0.6
    for bad in (dict(wbits=1), dict(abits=12), dict(method="awq"), dict(block_size=96), dict(a_clip=1.5)):
        with pytest.raises(ValueError):
            QuantConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        QuantConfig.from_dict({"method": "rtn", "bogus": 1})


def test_tiny_config_families_are_distinct():
    assert type(tiny_config("qwen2")).__name__ == "Qwen2Config"


def test_statistics_pass_without_outputs_stops_before_down_proj(tokens):
    """collect(..., want_outputs=False) gives the statistics of the full pass and never runs
    the rest of the layer after the last group's input (down_proj)."""
    from duquant.methods.statistics import collect
    from duquant.modeling.adapters import adapter_for
    from duquant.sequential import capture_layer0_inputs

    model = tiny_model("llama")
    adapter = adapter_for(model)
    inputs = capture_layer0_inputs(model, adapter, tokens, torch.device("cpu"), batch_size=2, offload=False)
    layer = adapter.decoder_layers(model)[0]
    full, outputs = collect(layer, adapter, inputs, torch.device("cpu"), want_absmax=True, want_mean=True)
    calls = []
    handle = layer.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        early, none = collect(layer, adapter, inputs, torch.device("cpu"), want_absmax=True, want_mean=True,
                              want_outputs=False)
    finally:
        handle.remove()
    assert none is None and outputs is not None and calls == []
    for name in full.absmax:
        assert torch.equal(full.absmax[name], early.absmax[name])
        assert torch.equal(full.mean_sequence(name), early.mean_sequence(name))
