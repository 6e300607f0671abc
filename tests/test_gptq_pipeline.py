"""GPTQ inside the layer-by-layer pipeline, after each method's transforms."""
import copy

import pytest
import torch
from conftest import tiny_model

from duquant import QuantConfig, quantize
from duquant.methods.gptq_layer import transformed_hessian
from duquant.methods.plan import GroupTransform
from duquant.transforms.online import OnlineTransform


def last_hidden(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "duquant", "quarot"])
def test_gptq_beats_rtn_at_w4a16(method):
    """Per decoder layer output (and logits): GPTQ's error is below RTN's on calibration data."""
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(3))
    base = tiny_model("qwen2")
    with torch.no_grad():
        ref = base(input_ids=calib).logits
    errors = {}
    for rounding in ("rtn", "gptq"):
        model = copy.deepcopy(base)
        config = QuantConfig(method=method, wbits=4, abits=16, w_clip=1.0, weight_quantizer=rounding,
                             rotation_steps=8)
        quantize(model, config, calib, device="cpu", batch_size=4, progress=False)
        with torch.no_grad():
            out = model(input_ids=calib).logits
        errors[rounding] = float((out - ref).norm() / ref.norm())
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_lowers_each_layer_output_error():
    """Layer by layer (hidden states after each decoder layer), DuQuant + GPTQ vs DuQuant + RTN."""
    calib = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(4))
    base = tiny_model("llama")
    ref = last_hidden(base, calib)
    hidden = {}
    for rounding in ("rtn", "gptq"):
        model = copy.deepcopy(base)
        config = QuantConfig(method="duquant", abits=16, weight_quantizer=rounding, rotation_steps=8)
        quantize(model, config, calib, device="cpu", batch_size=4, progress=False)
        hidden[rounding] = last_hidden(model, calib)
    for depth in range(1, len(ref)):
        err = {k: float((h[depth] - ref[depth]).norm() / ref[depth].norm()) for k, h in hidden.items()}
        assert err["gptq"] < err["rtn"], (depth, err)


def test_hessian_is_taken_after_the_online_transform():
    """Gᵀ·(XᵀX)·G equals the Hessian of the transformed input X·G."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    plan = GroupTransform(rot1=q, perm=torch.randperm(32, generator=gen), hadamard=True)
    xg = OnlineTransform(32, plan.rot1, plan.perm, None, True).fold_into_weight(x)  # rows of X times G
    assert torch.allclose(transformed_hessian(x.T @ x, plan), xg.T @ xg, atol=1e-9)
    assert torch.equal(transformed_hessian(x.T @ x, GroupTransform()), x.T @ x)


def test_gptq_options_reach_the_rounding(monkeypatch):
    import duquant.methods.gptq_layer as gl

    seen = []
    real = gl.gptq_quantize

    def spy(weight, hessian, spec, damp, act_order):
        seen.append((damp, act_order, spec.group_size))
        return real(weight, hessian, spec, damp=damp, act_order=act_order)

    monkeypatch.setattr(gl, "gptq_quantize", spy)
    calib = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(5))
    config = QuantConfig(method="rtn", weight_quantizer="gptq", gptq_damp=0.05, gptq_act_order=True, w_group_size=16)
    quantize(tiny_model("llama"), config, calib, device="cpu", progress=False)
    assert len(seen) == 2 * 7 and set(seen) == {(0.05, True, 16)}
