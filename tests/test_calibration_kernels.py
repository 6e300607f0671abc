"""RMSNorm and RoPE on kernels while calibrating (`modeling.calibration_kernels`,
`modeling.fused_rms_norm`): wiring on the CPU. The kernels themselves:
test_kernels_interpret.py (Triton interpreter; there also a whole quantization through them)
and test_kernels_gpu.py."""
from __future__ import annotations

import torch
from conftest import tiny_model

from duquant.modeling.calibration_kernels import calibration_kernels
from duquant.modeling.fused_rms_norm import fuse_rms_norms, is_fused, unfuse_rms_norms
from duquant.modeling.fused_rope import fuse_rotary
from duquant.modeling.fused_rope import is_fused as rotary_is_fused


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_fuse_rms_norms_rebinds_the_norms_only_and_is_undoable(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 9))
    before = _logits(model, ids)
    names = fuse_rms_norms(model)
    layers = len(model.model.layers)
    want = [f"model.layers.{i}.{n}" for i in range(layers) for n in ("input_layernorm", "post_attention_layernorm")]
    assert names == want + ["model.norm"]
    assert fuse_rms_norms(model) == []  # idempotent
    assert torch.equal(_logits(model, ids), before)  # on the CPU the class's forward runs
    assert unfuse_rms_norms(model, names[:1]) == names[:1] and not is_fused(model.model.layers[0].input_layernorm)
    assert unfuse_rms_norms(model) == names[1:] and not any(is_fused(m) for m in model.modules())
    assert "_kernel_eps" not in vars(model.model.norm)


def test_a_norm_that_computes_something_else_is_left_alone() -> None:
    class ScaledRMSNorm(torch.nn.Module):  # Gemma-style (1 + w): not transformers' LLaMA norm
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.full((8,), 0.5)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    assert fuse_rms_norms(torch.nn.Sequential(ScaledRMSNorm())) == []


def test_calibration_kernels_do_nothing_on_the_cpu_and_keep_earlier_fusions(monkeypatch) -> None:
    model = tiny_model("llama")
    with calibration_kernels(model, torch.device("cpu")):
        assert not any(is_fused(m) or rotary_is_fused(m) for m in model.modules())
    fuse_rotary(model)  # the user's own fusion, from before
    monkeypatch.setenv("DUQUANT_TRITON_INTERPRET", "1")  # makes the CPU count as a Triton device
    with calibration_kernels(model, torch.device("cpu")):
        assert is_fused(model.model.layers[0].input_layernorm)
    assert not any(is_fused(m) for m in model.modules())
    assert all(rotary_is_fused(layer.self_attn) for layer in model.model.layers)  # left as they were
