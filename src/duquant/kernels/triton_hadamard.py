"""Fused QuaRot online Hadamard + per-token asymmetric quantization (one kernel).

H_K = H_m ⊗ H_p / √K with p a power of two. Writing p = (p/n)·n with n ≤ 128 and
H_A = H_m ⊗ H_{p/n} (A = K/n, a small dense ±1 matrix built once on the host), a token
row viewed as X [A, n] maps to Y = H_Aᵀ · X · H_n / √K: two small tensor-core products
on a tile that fits in registers. So each program keeps one whole token row on chip at
a time, gets its min/max from registers and writes the codes in the same pass: x is read
once and the codes written once. It loops over several tokens so that H_A and H_n are
loaded once per program. All ±1 entries are exact in bf16; fast mode rounds X·H_n to
bf16 before the second product, precise mode runs both products as 3×TF32 (≈ fp32).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from duquant.kernels.reference import hadamard_split, sylvester
from duquant.kernels.triton_quant import asym_qparams, centered_codes


@triton.jit
def hadamard_quant_kernel(
    x_ptr, ha_ptr, hn_ptr, out_ptr, scale_ptr,
    M, A, stride_xm, stride_om, tokens_per_prog, inv_sqrt_k, clip, qmax,
    A_PAD: tl.constexpr, N_BLK: tl.constexpr, PRECISE: tl.constexpr,
):
    pid = tl.program_id(0)
    ra = tl.arange(0, A_PAD)
    rn = tl.arange(0, N_BLK)
    a_ok = ra < A
    hn = tl.load(hn_ptr + rn[:, None] * N_BLK + rn[None, :])  # bf16 ±1, symmetric
    ha_t = tl.load(ha_ptr + ra[:, None] * A_PAD + ra[None, :])  # bf16 H_Aᵀ, zero-padded
    offs = ra[:, None] * N_BLK + rn[None, :]
    t0 = pid * tokens_per_prog
    for t in range(t0, t0 + tokens_per_prog):
        t_ok = t < M
        ok = a_ok[:, None] & t_ok
        x = tl.load(x_ptr + t * stride_xm + offs, mask=ok, other=0.0)
        if PRECISE:
            z = tl.dot(x.to(tl.float32), hn.to(tl.float32), input_precision="tf32x3")
            y = tl.dot(ha_t.to(tl.float32), z, input_precision="tf32x3")
        else:
            z = tl.dot(x.to(tl.bfloat16), hn)  # [A_PAD, n] fp32, exact products
            y = tl.dot(ha_t, z.to(tl.bfloat16))
        y = y * inv_sqrt_k
        lo = tl.min(tl.min(tl.where(a_ok[:, None], y, float("inf")), axis=1), axis=0)
        hi = tl.max(tl.max(tl.where(a_ok[:, None], y, float("-inf")), axis=1), axis=0)
        scale, zero = asym_qparams(lo, hi, clip, qmax)
        tl.store(scale_ptr + t, scale, mask=t_ok)
        ones = tl.full([A_PAD], 1.0, tl.float32)
        a = centered_codes(y, ones * scale, ones * zero, qmax)
        tl.store(out_ptr + t * stride_om + offs, a.to(out_ptr.dtype.element_ty), mask=ok)


_FACTORS: dict[tuple, tuple[torch.Tensor, torch.Tensor, int, int]] = {}


def hadamard_factors(k: int, had_m: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(H_Aᵀ padded to A_PAD, bf16; H_n bf16; A; n), cached per (K, factor, device)."""
    key = (k, None if had_m is None else (had_m.data_ptr(), had_m.shape[0]), device)
    if key not in _FACTORS:
        m, p = hadamard_split(k, had_m)
        n = min(p, 128)
        if n < 16:
            raise ValueError(f"K={k}: power-of-two part {p} < 16 is too small for the tensor-core path")
        outer = sylvester(p // n)
        if had_m is not None:
            outer = torch.kron(had_m.to(torch.float32).cpu().contiguous(), outer)
        a = outer.shape[0]
        a_pad = max(16, triton.next_power_of_2(a))
        ha_t = torch.zeros(a_pad, a_pad)
        ha_t[:a, :a] = outer.T
        _FACTORS[key] = (ha_t.to(device, torch.bfloat16), sylvester(n).to(device, torch.bfloat16), a, n)
    return _FACTORS[key]


def hadamard_quantize(x: torch.Tensor, had_m: torch.Tensor | None, bits: int = 4, clip: float = 0.9,
                      out_dtype: torch.dtype = torch.int8, precise: bool = False,
                      tokens_per_prog: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel. x [..., K] -> (a [M, K] out_dtype, scale float32 [M])."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    ha_t, hn, a, n = hadamard_factors(k, had_m, x.device)
    out = torch.empty((m, k), dtype=out_dtype, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    tpp = max(1, min(tokens_per_prog, triton.cdiv(m, 132)))
    hadamard_quant_kernel[(triton.cdiv(m, tpp),)](
        x2, ha_t, hn, out, scale, m, a, x2.stride(0), out.stride(0), tpp, 1.0 / math.sqrt(k),
        float(clip), float((1 << bits) - 1), A_PAD=ha_t.shape[0], N_BLK=n, PRECISE=precise,
        num_warps=4 if ha_t.shape[0] * n <= 4096 else 8, num_stages=1 if ha_t.shape[0] >= 128 else 2,
    )
    return out, scale
