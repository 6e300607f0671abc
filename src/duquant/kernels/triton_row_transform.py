"""DuQuant online transform + per-token quantization with each token's row inside one
program ("rows" kernel, v4; the three-stage `triton_transform` kernel is "tiles").

The permutation mixes all K/n blocks of a row, which is why `triton_transform` needs
programs that meet at a barrier (or three launches). Here one program owns whole rows
instead: T tokens, their K/n blocks stacked as the rows of one [T·K/n, n] tile, so that
each block rotation is a single tensor-core product ([T·K/n, n] × [n, n], the blocks are
the MMA's M dimension) instead of K/n small dependent ones (v1's latency chain):

    X [T·K/n, n]  = x rows, block b of token t at row t·NB_PAD + b (NB_PAD = K/n → 2^j)
    U             = (X / smooth) · R̂₁
    V[t·NB_PAD + b, j] = U[token t's row, flattened][perm[b·n + j]]   (the permutation as
                                    one `tl.gather` of the tile, through shared memory;
                                    precise mode: through a float32 scratch row in L1/L2)
    Y             = V · R̂₂, per-token min/max over the token's rows, codes, store.

One launch, no inter-program barrier, HBM traffic = x + codes. Padded block rows (K/n
not a power of two) are masked. One token per program up to 64 tokens, 64-row tiles above
(T = 2 at K = 4096; `row_tile`). Up to session 7 the gather went
through a global scratch row (store, CTA barrier, load): on the H100 the shared-memory
gather took one token of K = 4096 from 7.1 to 6.7 µs and four tokens from 25.3 to 20.6 µs
(results/kernels/session8/transform_breakdown.md; loading every factor at the start, or
asking L2 for them first, gained ≤ 0.3 µs or lost, and were not kept).
Numerics are those of the tiles kernel (fast: bf16 operands, the rotated row held as
bf16; precise: fp32, 3×TF32 products). The fused RMSNorm and SwiGLU inputs of the
tiles kernel are here too, simpler: the program holds whole rows, so Σx² is a row sum and
the row is normalised (and rounded, as the model rounds it) before the transform.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from duquant.kernels.dependent_launch import pdl_supported
from duquant.kernels.norm import InputNorm
from duquant.kernels.triton_fused_input import inverse_rms, rms_normalized, swiglu_rounded
from duquant.kernels.triton_quant import centered_codes, reciprocal_codes, token_qparams
from duquant.kernels.triton_transform import (
    _buffer,
    _dot,
    prepared_factors,
    rotation_block,
    token_rows_and_outputs,
)


@triton.jit
def row_transform_quant_kernel(
    x_ptr, smooth_ptr, rot1_ptr, perm_ptr, rot2_ptr, scratch_ptr, out_ptr, scale_ptr, norm_w_ptr, up_ptr,
    M, K, NB, stride_xm, stride_om, clip, qmax, eps,
    N: tl.constexpr, NB_PAD: tl.constexpr, T: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_R2: tl.constexpr, PRECISE: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_NORM: tl.constexpr, NORM_W: tl.constexpr, GATED: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr = False,
    RECIP: tl.constexpr = False, EVEN: tl.constexpr = False,
):
    """RECIP: codes from y·(1/Δ) (`centered_codes`). EVEN: M is a multiple of T and K/n a
    power of two, so no tile element is padding and no mask is computed."""
    if LAUNCH_DEPENDENTS:  # the decode GEMV after this kernel may start fetching its weight now
        gdc_launch_dependents()
    transform_rows(tl.program_id(0), x_ptr, smooth_ptr, rot1_ptr, perm_ptr, rot2_ptr, scratch_ptr, out_ptr, scale_ptr,
                   norm_w_ptr, up_ptr, M, K, NB, stride_xm, stride_om, clip, qmax, eps, N, NB_PAD, T, HAS_SMOOTH,
                   HAS_R1, HAS_PERM, HAS_R2, PRECISE, SYMMETRIC, HAS_NORM, NORM_W, GATED, RECIP, EVEN)


@triton.jit
def transform_rows(
    pid, x_ptr, smooth_ptr, rot1_ptr, perm_ptr, rot2_ptr, scratch_ptr, out_ptr, scale_ptr, norm_w_ptr, up_ptr,
    M, K, NB, stride_xm, stride_om, clip, qmax, eps,
    N: tl.constexpr, NB_PAD: tl.constexpr, T: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_R2: tl.constexpr, PRECISE: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_NORM: tl.constexpr, NORM_W: tl.constexpr, GATED: tl.constexpr, RECIP: tl.constexpr, EVEN: tl.constexpr,
):
    """Tokens pid·T … pid·T + T − 1: transform, quantize, store codes and scales (the body of
    `row_transform_quant_kernel`, also the producer half of `triton_fused_decode`)."""
    R: tl.constexpr = T * NB_PAD
    r = tl.arange(0, R)
    tok = pid * T + r // NB_PAD  # token of each tile row
    blk = r % NB_PAD  # its block
    c = tl.arange(0, N)
    col = blk[:, None] * N + c[None, :]  # channel of each element [R, N]
    if EVEN:  # a constant mask: the compiler drops every masked load, select and store test
        ok = tl.full([R, 1], 1, tl.int1)
    else:
        ok = ((tok < M) & (blk < NB))[:, None]
    offs = tok.to(tl.int64)[:, None] * stride_xm + col
    # Padding (blocks past K, tokens past M) reads 1, not 0: IEEE division (div_rn, in the
    # smoothing and the quantizer) takes a slow path when the quotient is 0 (see the tiles
    # kernel's _rot1_store). Padding is masked out of every sum, min and max, and never stored.
    h = tl.load(x_ptr + offs, mask=ok, other=1.0).to(tl.float32)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    if GATED:  # silu(gate)·up (x is the gate projection), rounded as the model rounds it
        h = swiglu_rounded(h, tl.load(up_ptr + offs, mask=ok, other=1.0).to(tl.float32), DT)
    if HAS_NORM:  # the model's RMSNorm output, rounded as it rounds it (triton_fused_input)
        sq = tl.sum(tl.where(ok, h * h, 0.0), axis=1)
        rinv = inverse_rms(tl.sum(tl.reshape(sq, [T, NB_PAD]), axis=1), K, eps)  # [T]
        rinv_rows = tl.reshape(tl.broadcast_to(rinv[:, None], [T, NB_PAD]), [R])[:, None]
        if NORM_W:  # one token's weights, shared by the T tokens
            b_w = tl.arange(0, NB_PAD)
            w = tl.load(norm_w_ptr + b_w[:, None] * N + c[None, :], mask=(b_w < NB)[:, None], other=1.0)
            w = tl.reshape(tl.broadcast_to(w[None, :, :], [T, NB_PAD, N]), [R, N])
        else:
            w = 0.0
        h = rms_normalized(h, rinv_rows, w, DT, norm_w_ptr.dtype.element_ty, NORM_W)
    if HAS_SMOOTH:
        h = tl.math.div_rn(h, tl.load(smooth_ptr + col, mask=ok, other=1.0))
    rr = tl.arange(0, N)
    if HAS_R1:
        h = _dot(h, tl.load(rot1_ptr + rr[:, None] * N + rr[None, :]), PRECISE)
    if HAS_PERM:  # v[t, j] = u[t, perm[j]]
        # one token's permutation, loaded once and shared by the program's T tokens
        b_of = tl.arange(0, NB_PAD)
        src = tl.load(perm_ptr + b_of[:, None] * N + c[None, :], mask=(b_of < NB)[:, None], other=0)
        src = tl.reshape(tl.broadcast_to(src[None, :, :], [T, NB_PAD, N]), [R, N])
        if PRECISE:  # through a scratch row (float32: a shared-memory gather would need 2× the H100's 227 KB)
            row = scratch_ptr + tok.to(tl.int64)[:, None] * K
            tl.store(row + col, h, mask=ok)
            tl.debug_barrier()  # the whole row is written before any thread gathers from it
            h = tl.load(row + src, mask=ok, other=1.0)
        else:  # a gather inside the program, through shared memory
            flat = (r // NB_PAD)[:, None] * (NB_PAD * N) + src  # index into this program's flattened tile
            g = tl.gather(tl.reshape(h.to(tl.bfloat16), [R * N]), tl.reshape(flat, [R * N]), 0)
            h = tl.where(ok, tl.reshape(g, [R, N]).to(tl.float32), 1.0)  # padding reads 1 again
    if HAS_R2:
        h = _dot(h, tl.load(rot2_ptr + rr[:, None] * N + rr[None, :]), PRECISE)
    # per-token range: min/max of each tile row, then over the NB_PAD rows of a token
    lo = tl.min(tl.reshape(tl.min(tl.where(ok, h, float("inf")), axis=1), [T, NB_PAD]), axis=1)
    hi = tl.max(tl.reshape(tl.max(tl.where(ok, h, float("-inf")), axis=1), [T, NB_PAD]), axis=1)
    scale, zero = token_qparams(lo, hi, clip, qmax, SYMMETRIC)  # [T]
    ts = pid * T + tl.arange(0, T)
    tl.store(scale_ptr + ts, scale, mask=ts < M)
    scale_rows = tl.reshape(tl.broadcast_to(scale[:, None], [T, NB_PAD]), [R])
    zero_rows = tl.reshape(tl.broadcast_to(zero[:, None], [T, NB_PAD]), [R])
    a = centered_codes(h, scale_rows, zero_rows, qmax, RECIP)
    tl.store(out_ptr + tok.to(tl.int64)[:, None] * stride_om + col, a.to(out_ptr.dtype.element_ty), mask=ok)


# Tokens per program. H100 (results/kernels/session12/transform_small_m.md, K = 4096): up to 64
# tokens one token per program is fastest (5.2–5.9 µs at M = 1…64; two per program 5.9–6.8,
# session 11's decode tile of 128 rows, i.e. four tokens on 8 warps, 9–17 at M = 4…16); at
# M = 256 and above 64-row tiles (T = 2 at K = 4096) win (6.6 against 8.3 µs; session 11:
# by 1–22% at M ≥ 2048 over 128-row tiles).
ONE_TOKEN_MAX_M, PREFILL_TILE_ROWS = 64, 64


def tile_warps(t: int, nb_pad: int, n: int) -> int:
    """4 warps up to 8192 tile elements (T·NB_PAD·n), 8 above."""
    return 8 if t * nb_pad * n > 8192 else 4


def row_tile(k: int, n: int, m: int = 1) -> tuple[int, int, int]:
    """(NB_PAD, T, warps) for m tokens: block rows padded to a power of two; one token per
    program up to ONE_TOKEN_MAX_M tokens, else PREFILL_TILE_ROWS tile rows; 4 warps up to 8192
    tile elements, 8 above (K = 11008's 128 × 128 tile: 12.0 against 18.6 µs on 4 warps)."""
    nb_pad = triton.next_power_of_2(k // n)
    t = 1 if m <= ONE_TOKEN_MAX_M else max(1, PREFILL_TILE_ROWS // nb_pad)
    return nb_pad, t, tile_warps(t, nb_pad, n)


@dataclass
class RowsLaunch:
    """What a launch of `transform_rows` needs: the runtime arguments and the compile-time
    ones (in the kernel's order), its program count and warps, and the outputs it fills."""
    args: tuple
    meta: dict
    programs: int
    warps: int
    codes: torch.Tensor
    scale: torch.Tensor


def rows_launch(x: torch.Tensor, rot1: torch.Tensor | None, perm: torch.Tensor | None, rot2: torch.Tensor | None,
                smooth: torch.Tensor | None, bits: int = 4, clip: float = 0.9, out_dtype: torch.dtype = torch.int8,
                precise: bool = False, tokens_per_program: int | None = None, symmetric: bool = False,
                norm: InputNorm | None = None, up: torch.Tensor | None = None,
                fast_quant: bool | None = None) -> RowsLaunch:
    """Arguments of `transform_rows` for x [..., K] (see `duquant_quantize_rows`)."""
    k = x.shape[-1]
    n = rotation_block(k, rot1, rot2)
    x2, up2, out, scale = token_rows_and_outputs(x, out_dtype, up, norm)
    m = x2.shape[0]
    f = prepared_factors(rot1, perm, rot2, smooth, precise)
    nb_pad, t, w = row_tile(k, n, m)
    if tokens_per_program:
        t = tokens_per_program
        w = tile_warps(t, nb_pad, n)
    dummy = scale
    scratch = _buffer("rows", m * k, torch.float32, x.device) if precise and perm is not None else dummy
    norm_w = None if norm is None or norm.weight is None else norm.weight.contiguous()
    args = (x2, *(v if v is not None else dummy for v in (f.smooth, f.rot1, f.perm, f.rot2)), scratch, out, scale,
            norm_w if norm_w is not None else dummy, up2 if up2 is not None else dummy,
            m, k, k // n, x2.stride(0), out.stride(0), float(clip), float((1 << bits) - 1),
            float(norm.eps) if norm is not None else 0.0)
    meta = dict(N=n, NB_PAD=nb_pad, T=t, HAS_SMOOTH=f.smooth is not None, HAS_R1=f.rot1 is not None,
                HAS_PERM=f.perm is not None, HAS_R2=f.rot2 is not None, PRECISE=precise, SYMMETRIC=symmetric,
                HAS_NORM=norm is not None, NORM_W=norm_w is not None, GATED=up2 is not None,
                RECIP=reciprocal_codes(precise, fast_quant), EVEN=m % t == 0 and nb_pad == k // n)
    return RowsLaunch(args, meta, triton.cdiv(m, t), w, out, scale)


def duquant_quantize_rows(x: torch.Tensor, rot1: torch.Tensor | None, perm: torch.Tensor | None,
                          rot2: torch.Tensor | None, smooth: torch.Tensor | None, bits: int = 4, clip: float = 0.9,
                          out_dtype: torch.dtype = torch.int8, precise: bool = False,
                          tokens_per_program: int | None = None, warps: int | None = None,
                          symmetric: bool = False, norm: InputNorm | None = None,
                          up: torch.Tensor | None = None, fast_quant: bool | None = None,
                          max_regs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `triton_transform.duquant_quantize`: x [..., K] -> (a [M, K], scale [M]).
    fast_quant: codes through a reciprocal (`centered_codes` RECIP; default: in fast mode).
    max_regs: registers per thread the compiler may use (None: its choice)."""
    launch = rows_launch(x, rot1, perm, rot2, smooth, bits, clip, out_dtype, precise, tokens_per_program, symmetric,
                         norm, up, fast_quant)
    if launch.programs == 0:
        return launch.codes, launch.scale
    row_transform_quant_kernel[(launch.programs,)](
        *launch.args, **launch.meta, LAUNCH_DEPENDENTS=pdl_supported(x.device), num_warps=warps or launch.warps,
        **({"maxnreg": max_regs} if max_regs else {}),
    )
    return launch.codes, launch.scale
