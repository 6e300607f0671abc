"""The real W4A4 execution mode (duquant.modeling.real_linear) against the simulated one.

CPU: RealQuantLinear runs the pure-PyTorch references of the kernels (integer codes,
float64-exact integer GEMM). Per layer, the real output equals the simulated QuantLinear
up to float rounding (a code may flip where x·G lands on a rounding boundary); the
logits of the whole model stay close.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from duquant import QuantConfig, quantize
from duquant.modeling.qlinear import QuantLinear
from duquant.modeling.real_linear import RealQuantLinear, supports_real, to_real_backend


def _quantized(tokens, **kwargs):
    model = tiny_model("llama")
    quantize(model, QuantConfig(**({"method": "duquant", "rotation_steps": 8} | kwargs)), tokens, device="cpu",
             batch_size=2, progress=False)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("method", ["duquant", "rtn", "quarot"])
def test_every_layer_matches_simulated(tokens, method):
    # QuaRot: symmetric weights and activations, an online Hadamard on down_proj
    extra = dict(w_symmetric=True, a_symmetric=True) if method == "quarot" else {}
    model = _quantized(tokens, method=method, **extra)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert layers and all(supports_real(m) for _, m in layers)
    if method == "duquant":
        assert any(m.input_transform is not None and m.input_transform.perm is not None for _, m in layers)
    if method == "quarot":
        assert all(m.act_spec.symmetric for _, m in layers)
        assert any(m.input_transform is not None and m.input_transform.hadamard for _, m in layers)
    gen = torch.Generator().manual_seed(0)
    for name, sim in layers:
        x = torch.randn(3, 5, sim.in_features, generator=gen)
        x[..., 1] *= 10  # an outlier channel
        real = RealQuantLinear(sim)
        with torch.no_grad():
            ys, yr = sim(x), real(x)
        assert yr.shape == ys.shape and yr.dtype == ys.dtype
        rel = float((yr - ys).norm() / ys.norm())
        assert rel < 1e-2, (name, rel)  # code flips at rounding boundaries only
        close = torch.isclose(yr, ys, rtol=1e-4, atol=1e-4 * float(ys.abs().max()))
        assert float(close.float().mean()) > 0.9, name


def test_hadamard_layer_matches_simulated():
    from duquant.quant.quantizer import QuantSpec, compute_qparams, quantize as quant_codes
    from duquant.transforms.online import OnlineTransform

    k, n = 96, 24  # 96 = 12·8: a dense base factor and a Sylvester part
    gen = torch.Generator().manual_seed(1)
    t = OnlineTransform(k, hadamard=True)
    w = t.fold_into_weight(torch.randn(n, k, generator=gen, dtype=torch.float64)).float()
    wspec = QuantSpec(bits=4, clip=1.0)
    sim = QuantLinear(k, n, True, wspec, QuantSpec(bits=4, clip=0.9), t)
    scale, zero = compute_qparams(w, wspec)
    sim.set_weight(codes=quant_codes(w, scale, zero, wspec), scale=scale, zero=zero)
    sim.bias.data.normal_(generator=gen)
    x = torch.randn(7, k, generator=gen)
    with torch.no_grad():
        ys, yr = sim(x), RealQuantLinear(sim)(x)
    assert float((yr - ys).norm() / ys.norm()) < 1e-2


def test_to_real_backend_swaps_layers_and_logits_stay_close(tokens):
    model = _quantized(tokens)
    ref = _logits(model, tokens)
    real = copy.deepcopy(model)
    report = to_real_backend(real)
    assert report["real"] and not report["simulated"]
    assert not any(isinstance(m, QuantLinear) for m in real.modules())
    assert sum(isinstance(m, RealQuantLinear) for m in real.modules()) == len(report["real"])
    out = _logits(real, tokens)
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 2e-2, rel
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.95


def test_layers_without_a_kernel_stay_simulated(tokens):
    model = _quantized(tokens, method="rtn", abits=16)
    report = to_real_backend(model)
    assert not report["real"] and report["simulated"]


def test_siblings_share_one_transform_per_activation(tokens, monkeypatch):
    """q/k/v read one activation through one transform, and so do gate/up: the real mode
    must quantize it once (4 transforms per LLaMA layer, not 7), also after a `.to()`."""
    from duquant.kernels import ops

    model = _quantized(tokens)
    to_real_backend(model)
    model.to(torch.float64).to(torch.float32)  # copies the shared factor tensors apart
    calls = []
    original = ops.transform_quantize
    monkeypatch.setattr(ops, "transform_quantize", lambda *a, **k: calls.append(1) or original(*a, **k))
    _logits(model, tokens[:1])
    assert len(calls) == 4 * model.config.num_hidden_layers
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.transform_id == attn.k_proj.transform_id == attn.v_proj.transform_id != attn.o_proj.transform_id


@pytest.mark.parametrize("method", ["duquant", "quarot"])
def test_fusion_keeps_the_logits_and_unfuses_cleanly(tokens, method):
    """fuse=True (the default): the RMSNorms in front of q/k/v and gate/up become pass-throughs and their
    consumers normalise inside the transform; down_proj forms silu(gate)·up in its own. On
    CPU the reference path computes both exactly as transformers does, so the logits are
    the unfused real backend's; unfusing gives the original modules and state_dict back."""
    from duquant.modeling.fusion import DeferredRMSNorm, FusedSwiGLU
    from duquant.modeling.real_linear import to_simulated_backend

    model = _quantized(tokens, method=method)
    keys = set(model.state_dict())
    plain = copy.deepcopy(model)
    to_real_backend(plain, fuse=False)
    report = to_real_backend(model)  # fuse=True is the default
    assert len(report["fused"]) == 3 * model.config.num_hidden_layers
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, DeferredRMSNorm) and isinstance(layer.post_attention_layernorm,
                                                                             DeferredRMSNorm)
    assert isinstance(layer.mlp, FusedSwiGLU)
    torch.testing.assert_close(_logits(model, tokens), _logits(plain, tokens), rtol=1e-5, atol=1e-5)
    to_simulated_backend(model)
    assert not any(isinstance(m, (DeferredRMSNorm, FusedSwiGLU)) for m in model.modules())
    assert set(model.state_dict()) == keys


def test_norms_with_a_simulated_consumer_stay(tokens):
    from duquant.modeling.fusion import fuse_norms

    model = _quantized(tokens)
    to_real_backend(model, fuse=False)
    attn = model.model.layers[0].self_attn
    attn.k_proj = attn.k_proj.source  # one consumer back on the simulated path
    fused = fuse_norms(model)
    assert "model.layers.0.input_layernorm" not in fused and "model.layers.0.post_attention_layernorm" in fused


def test_siblings_join_one_decode_gemv(tokens, monkeypatch):
    """q/k/v and gate/up each form one `JoinedDecode` (o_proj and down_proj stay alone); with
    the joined path taken, each group computes its stacked output once per input and every
    sibling gets exactly its own columns: the logits equal those of the unjoined real backend
    bit for bit (on CPU the joined linear runs the per-weight references)."""
    from duquant.kernels import ops
    from duquant.modeling.joined_decode import JoinedDecode

    model = _quantized(tokens)
    plain = copy.deepcopy(model)
    to_real_backend(plain, join_decode=False)
    to_real_backend(model)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp.mlp  # the MLP sits inside FusedSwiGLU
    qkv, gate_up = attn.q_proj.__dict__["joined_decode"], mlp.gate_proj.__dict__["joined_decode"]
    assert qkv.members == [attn.q_proj, attn.k_proj, attn.v_proj] and gate_up.members == [mlp.gate_proj, mlp.up_proj]
    assert "joined_decode" not in attn.o_proj.__dict__ and "joined_decode" not in mlp.down_proj.__dict__
    assert qkv.columns(attn.k_proj) == (attn.q_proj.out_features, attn.q_proj.out_features + attn.k_proj.out_features)
    assert "joined_decode" not in plain.model.layers[0].self_attn.q_proj.__dict__

    monkeypatch.setattr(JoinedDecode, "applies", lambda self, x: True)
    runs = []
    original = ops.w4a4_linear_joined
    monkeypatch.setattr(ops, "w4a4_linear_joined", lambda *a, **k: runs.append(len(a[2])) or original(*a, **k))
    out = _logits(model, tokens[:2])
    assert runs == [3, 2] * model.config.num_hidden_layers
    assert torch.equal(out, _logits(plain, tokens[:2]))


def test_calibration_through_the_real_kernels(tokens, monkeypatch):
    """calib_forward="real": the quantized prefix runs each just-quantized layer on the W4A4
    path (here the kernels' CPU references), which the run really takes (counted), and the
    model comes back all simulated (the checkpoint layout), its state-dict layout unchanged,
    its logits close to a simulated-calibration model's (on the GPU the prefix differs by the
    kernels' rounding; the CPU references may even reproduce the simulated prefix exactly)."""
    from duquant.modeling import real_linear

    calls = []
    original = real_linear.RealQuantLinear._linear
    monkeypatch.setattr(real_linear.RealQuantLinear, "_linear",
                        lambda self, *a: calls.append(1) or original(self, *a))
    real_calib = _quantized(tokens, calib_forward="real")
    assert calls  # the prefix ran on RealQuantLinear
    assert not any(isinstance(m, RealQuantLinear) for m in real_calib.modules())
    simulated = _quantized(tokens)
    assert real_calib.state_dict().keys() == simulated.state_dict().keys()
    ref, out = _logits(simulated, tokens), _logits(real_calib, tokens)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 5e-2, rel
    with pytest.raises(ValueError, match="calib_forward"):
        QuantConfig(calib_forward="kernels")
