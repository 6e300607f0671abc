"""Rotary position embedding of the queries and keys in one launch.

transformers' `apply_rotary_pos_emb` runs q·cos + rotate_half(q)·sin as five PyTorch ops per
tensor (mul, neg, cat, mul, add): ten kernel launches per layer, about 18 µs of a 7B decode
step's layer on the H100 (results/kernels/NOTES.md, session 7). Here one program per token
rotates all query and key heads of that token:

    out[d] = x[d]·cos[d] − x[d + D/2]·sin[d]        d < D/2
    out[d] = x[d]·cos[d] + x[d − D/2]·sin[d]        d ≥ D/2

in float32, rounded once to the input dtype (PyTorch rounds after every op, so the two can
differ by one unit in the last place). q, k: [B, H, S, D] with any strides but a unit one
on D (transformers passes transposed views of the projections); cos, sin: [B or 1, S, D].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, o_ptr, stride_h, stride_oh, H, c, sn, d, d_rot, H_PAD: tl.constexpr):
    h = tl.arange(0, H_PAD)
    ok = (h < H)[:, None]
    x = tl.load(x_ptr + h[:, None] * stride_h + d[None, :], mask=ok, other=0.0).to(tl.float32)
    xr = tl.load(x_ptr + h[:, None] * stride_h + d_rot[None, :], mask=ok, other=0.0).to(tl.float32)
    out = x * c[None, :] + xr * sn[None, :]
    tl.store(o_ptr + h[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def rotary_embedding_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, S, HQ, HK,
                            sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sqo_b, sqo_h, sqo_s, sko_b, sko_h, sko_s,
                            sc_b, sc_s, ss_b, ss_s,
                            D: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    s = (pid % S).to(tl.int64)
    d = tl.arange(0, D)
    d_rot = (d + D // 2) % D  # the partner of each channel in rotate_half
    c = tl.load(cos_ptr + b * sc_b + s * sc_s + d).to(tl.float32)
    sn = tl.load(sin_ptr + b * ss_b + s * ss_s + d).to(tl.float32) * tl.where(d < D // 2, -1.0, 1.0)
    _rotate_heads(q_ptr + b * sq_b + s * sq_s, qo_ptr + b * sqo_b + s * sqo_s, sq_h, sqo_h, HQ, c, sn, d, d_rot,
                  HQ_PAD)
    _rotate_heads(k_ptr + b * sk_b + s * sk_s, ko_ptr + b * sko_b + s * sko_s, sk_h, sko_h, HK, c, sn, d, d_rot,
                  HK_PAD)


def supported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The shapes and layouts the kernel takes; anything else goes to transformers' own op."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    b, _, s, d = q.shape
    if k.shape[0] != b or k.shape[2:] != (s, d) or cos.shape[1:] != (s, d) or cos.shape[0] not in (1, b):
        return False
    if d < 2 or d & (d - 1) or q.dtype != k.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return all(t.stride(-1) == 1 for t in (q, k, cos, sin)) and q.device == k.device == cos.device == sin.device


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin), cos/sin broadcast over the
    heads; outputs have the inputs' strides. Call only where `supported` says so."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0:
        return qo, ko
    cb, sb = (cos.stride(0) if cos.shape[0] > 1 else 0), (sin.stride(0) if sin.shape[0] > 1 else 0)
    rotary_embedding_kernel[(b * s,)](
        q, k, cos, sin, qo, ko, s, hq, hk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cb, cos.stride(1), sb, sin.stride(1),
        D=d, HQ_PAD=triton.next_power_of_2(hq), HK_PAD=triton.next_power_of_2(hk),
        num_warps=4 if (hq + hk) * d >= 4096 else 2,
    )
    return qo, ko
