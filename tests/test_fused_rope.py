"""The one-kernel rotary embedding's wiring (`modeling.fused_rope`) on CPU: which modules get
it, that it falls back to transformers' op where the kernel does not apply (the CPU, odd
arguments), that it is per model and undoable. The kernel itself: test_kernels_interpret.py
(Triton interpreter) and test_kernels_gpu.py."""
from __future__ import annotations

import torch
from conftest import tiny_model

from duquant.kernels import reference as ref
from duquant.modeling.fused_rope import (
    FusedRotary,
    fuse_rotary,
    is_fused,
    unfuse_rotary,
)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_fuse_rotary_rebinds_attention_only_and_is_undoable(family: str) -> None:
    model, other = tiny_model(family), tiny_model(family)
    ids = torch.randint(0, 96, (2, 9))
    before = _logits(model, ids)
    names = fuse_rotary(model)
    assert names == [f"model.layers.{i}.self_attn" for i in range(len(model.model.layers))]
    assert all(is_fused(layer.self_attn) for layer in model.model.layers)
    assert not any(is_fused(layer.self_attn) for layer in other.model.layers)  # per model, nothing global
    assert fuse_rotary(model) == []  # idempotent
    assert torch.equal(_logits(model, ids), before)  # on the CPU the module's own op runs
    assert unfuse_rotary(model) == names and not any(is_fused(m) for m in model.modules())
    assert torch.equal(_logits(model, ids), before)


def test_fused_rotary_falls_back_for_what_the_kernel_does_not_take() -> None:
    calls = []

    def original(q, k, cos, sin, *args, **kwargs):
        calls.append((args, kwargs))
        return q, k

    f = FusedRotary(original)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    f(q, k, cos, sin)  # CPU without the interpreter
    f(q, k, cos, sin, unsqueeze_dim=2)
    f(q, k, cos, sin, None, 1)  # an older signature (position_ids, unsqueeze_dim)
    assert calls == [((), {}), ((), {"unsqueeze_dim": 2}), ((None, 1), {})]


def test_rotary_reference_is_transformers_op_up_to_rounding() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 64, generator=gen).to(torch.bfloat16).transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    k = torch.randn(2, 3, 7, 64, generator=gen).to(torch.bfloat16)
    ang = torch.randn(2, 7, 32, generator=gen)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(torch.bfloat16), torch.cat([ang.sin()] * 2, -1).to(torch.bfloat16)
    for got, want in zip(ref.rotary_embedding_ref(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert got.shape == want.shape and got.dtype == want.dtype
        # transformers rounds after each op, the reference once: a few bf16 ulps at most
        assert float((got.float() - want.float()).abs().max()) <= 0.05
        assert float((got.float() - want.float()).abs().mean()) < 2e-3


def test_fused_rotary_leaves_differentiable_calls_to_transformers(monkeypatch) -> None:
    """Where the kernel would apply, it runs only for inputs autograd does not follow."""
    import pytest

    pytest.importorskip("triton")
    from duquant.kernels import ops, triton_rope

    monkeypatch.setattr(ops, "use_triton", lambda t: True)
    kernel_calls = []
    monkeypatch.setattr(triton_rope, "rotary_embedding", lambda q, k, c, s: kernel_calls.append(1) or (q, k))
    f = FusedRotary(lambda q, k, c, s, *a, **kw: (q, k))
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    f(q, k, cos, sin)
    assert kernel_calls == [1]
    f(q.requires_grad_(), k, cos, sin)
    assert kernel_calls == [1]
    with torch.no_grad():
        f(q, k, cos, sin)
    assert kernel_calls == [1, 1]
