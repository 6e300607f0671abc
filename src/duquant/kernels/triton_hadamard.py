"""Fused QuaRot online Hadamard + per-token asymmetric quantization (v2).

H_K = H_m ⊗ S_p / √K (S_p Sylvester, p a power of two, H_m the dense ±1 base factor or
none). With n = min(p, 128) and H_A = H_m ⊗ S_{p/n} (A = K/n) the row of a token, viewed
as X [A, n], maps to Y = H_Aᵀ · X · S_n / √K. That is the same "block rotation → shuffle →
block rotation" as DuQuant's transform, so it runs on the same three launches
(`triton_transform.two_stage_quantize`):
  stage 1: block rotation by S_n (±1, exact in bf16), stored transposed (scratch row
           j·A + a holds X[a, j]·S_n);
  stage 2: output block b covers G consecutive columns j; its rows (j, c) are
           Σ_a H_A[a, c]·Z[a, j], i.e. a block rotation by I_G ⊗ H_Aᵀ (A padded to a power
           of two, padded rows masked), written back to column c·n + j.
v1 (one token row per program, two products on an [A_PAD, n] tile) failed parity on the
first H100 run and is gone.
"""
from __future__ import annotations

import math

import torch

from duquant.kernels.reference import hadamard_split, sylvester
from duquant.kernels.norm import InputNorm
from duquant.kernels.tensor_cache import TensorKeyedCache
from duquant.kernels.triton_transform import two_stage_quantize

_PLAN = TensorKeyedCache()


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def hadamard_plan(k: int, had_m: torch.Tensor | None, device: torch.device, precise: bool = False) -> tuple:
    """(n, S_n, dest, N2, rot2ᵀ, srow, ocol) for K and the base factor, cached."""
    return _PLAN.get((had_m,), (k, device, precise), lambda: _make_plan(k, had_m, device, precise))


def _make_plan(k: int, had_m: torch.Tensor | None, device: torch.device, precise: bool) -> tuple:
    m, p = hadamard_split(k, had_m)
    n = min(p, 128)
    if n < 16:
        raise ValueError(f"K={k}: power-of-two part {p} < 16 is too small for the tensor-core path")
    outer = sylvester(p // n)
    if had_m is not None:
        outer = torch.kron(had_m.detach().to(torch.float32).cpu(), outer)
    a = outer.shape[0]
    a_pad = max(16, _next_pow2(a))
    g = max(1, 128 // a_pad)
    while n % g:
        g //= 2
    n2 = g * a_pad
    ha_t = torch.zeros(a_pad, a_pad)
    ha_t[:a, :a] = outer.T
    rot2t = torch.kron(torch.eye(g), ha_t)
    idx_a = torch.arange(a)
    dest = (torch.arange(n)[None, :] * a + idx_a[:, None]).reshape(-1)  # channel a·n + j -> row j·A + a
    nb = n // g
    jj = torch.arange(nb)[:, None, None] * g + torch.arange(g)[None, :, None]  # [nb, g, 1]
    c = torch.arange(a_pad)[None, None, :]
    ok = c < a
    srow = torch.where(ok, jj * a + c, torch.full_like(jj * c, -1)).reshape(-1)
    ocol = torch.where(ok, c * n + jj, torch.full_like(jj * c, -1)).reshape(-1)
    rdt = torch.float32 if precise else torch.bfloat16
    plan = (n, sylvester(n).to(device, rdt), dest.to(device, torch.int32), n2, rot2t.to(device, rdt),
            srow.to(device, torch.int32), ocol.to(device, torch.int32))
    return plan


def hadamard_quantize(x: torch.Tensor, had_m: torch.Tensor | None, bits: int = 4, clip: float = 0.9,
                      out_dtype: torch.dtype = torch.int8, precise: bool = False,
                      block_m: int | None = None, symmetric: bool = False,
                      norm: InputNorm | None = None, up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (a [M, K] out_dtype, scale float32 [M]) for x·(H_m ⊗ S_p)/√K (of
    RMSNorm(x) with `norm`, of silu(x)·up with `up`)."""
    k = x.shape[-1]
    n, s_n, dest, n2, rot2t, srow, ocol = hadamard_plan(k, had_m, x.device, precise)
    bm = block_m
    if bm is None and n2 > 128:
        bm = 16 if x.numel() // k <= 16 else 32
    return two_stage_quantize(x, n, s_n, dest, n2, rot2t, srow, ocol, None, 1.0 / math.sqrt(k), bits, clip,
                              out_dtype, precise, bm, symmetric=symmetric, norm=norm, up=up)
