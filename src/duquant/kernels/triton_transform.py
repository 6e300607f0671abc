"""Fused online transform + per-token asymmetric quantization (v2: three wide launches).

Both online transforms of the package are "block rotation → channel shuffle → block
rotation" per token row:
  * DuQuant: x/smooth · R̂₁ (n×n blocks) → permute → · R̂₂ (n×n blocks);
  * QuaRot's Hadamard H_K = H_A ⊗ H_n (A = K/n): x · (I_A ⊗ H_n) → transpose the [A, n]
    view of the row → · (I_n ⊗ H_A) → transpose back (see `triton_hadamard`).
The shuffle mixes all blocks, so no program that owns a slice of K can finish a row.
v1 kept whole rows in one program (BLOCK_M = 16 tokens) and ran 3·K/n small dependent
products per program, one or two programs per SM: latency-bound, 170 µs at
M = 2048, K = 4096. v2 splits the work into three launches of (token tile × block)
programs, thousands of independent programs each:
  A. u = (x/smooth)·R̂₁ for one [BLOCK_M, n] tile, stored *token-minor* into a scratch
     vT [K, M_pad] at row dest[c] (dest = inverse permutation): the shuffle happens on
     the store, and each stored row segment is BLOCK_M contiguous tokens (a full
     128-byte line at BLOCK_M = 64, bf16).
  B. a tile [N2, BLOCK_M] of vT (contiguous rows), yᵀ = R̂₂ᵀ·vT_tile, per-token partial
     min/max written to stats [K/N2, M_pad] (tiny).
  C. the same tile and product again (vT is L2-resident at prefill sizes; recomputing
     costs one more L2 read and a small MMA, cheaper than an fp32 round trip of y), the
     per-token min/max reduced from the stats, and the centered codes stored.
HBM traffic ≈ x read + vT write/read (mostly L2) + codes: ~2.5× the 8.4 µs floor at
M = 2048, K = 4096, instead of v1's latency chain.
Numerics: fast mode feeds the tensor cores bf16 (R̂ and x/smooth rounded to bf16, u
stored as bf16, fp32 accumulation); precise mode keeps u in float32 and runs the
products as 3×TF32 (≈ fp32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from duquant.kernels.triton_quant import asym_qparams, centered_codes


# Triton's CPU interpreter multiplies bf16 tiles wrongly (seen with triton 3.6): under
# TRITON_INTERPRET=1 the fast path rounds its operands to bf16 and multiplies in float32,
# which is the same arithmetic (bf16 products are exact in fp32).
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _dot(a, b, PRECISE: tl.constexpr):
    if PRECISE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    if _INTERPRET:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32))
    return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))


@triton.jit
def rot1_scatter_kernel(
    x_ptr, smooth_ptr, rot1_ptr, dest_ptr, vt_ptr, M, stride_xm, M_PAD,
    N1: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr,
    HAS_DEST: tl.constexpr, PRECISE: tl.constexpr,
):
    """vT[dest[c·N1 + j], m0 + i] = ((x/smooth)[m0 + i, c-block] · R̂₁)[i, j]."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, N1)
    cols = c * N1 + rn
    h = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=(rm < M)[:, None], other=0.0)
    h = h.to(tl.float32)
    if HAS_SMOOTH:
        h = tl.math.div_rn(h, tl.load(smooth_ptr + cols)[None, :])
    if HAS_R1:
        h = _dot(h, tl.load(rot1_ptr + rn[:, None] * N1 + rn[None, :]), PRECISE)
    if HAS_DEST:
        rows = tl.load(dest_ptr + cols)
    else:
        rows = cols
    # token-minor: one stored segment = BLOCK_M consecutive tokens of one channel
    tl.store(vt_ptr + rows.to(tl.int64)[None, :] * M_PAD + rm[:, None], h.to(vt_ptr.dtype.element_ty))


@triton.jit
def _rot2_tile(vt_ptr, rot2t_ptr, srow_ptr, b, rm, M_PAD, N2: tl.constexpr, KC: tl.constexpr, BLOCK_M: tl.constexpr,
               HAS_R2: tl.constexpr, HAS_MAP: tl.constexpr, PRECISE: tl.constexpr):
    """yᵀ [N2, BLOCK_M] = R̂₂ᵀ · vT[rows of output block b, tokens rm]; rows < 0 read as 0.
    The product runs in KC-wide slices of the reduction so that large blocks (N2 = 256)
    never hold a whole N2×N2 operand."""
    rr = tl.arange(0, N2)
    if HAS_R2:
        y = tl.zeros([N2, BLOCK_M], dtype=tl.float32)
        rk = tl.arange(0, KC)
        for kc in tl.static_range(0, N2, KC):
            if HAS_MAP:
                src = tl.load(srow_ptr + b * N2 + kc + rk)
                v = tl.load(vt_ptr + src.to(tl.int64)[:, None] * M_PAD + rm[None, :], mask=(src >= 0)[:, None],
                            other=0.0)
            else:
                src = b * N2 + kc + rk
                v = tl.load(vt_ptr + src.to(tl.int64)[:, None] * M_PAD + rm[None, :])
            r = tl.load(rot2t_ptr + rr[:, None] * N2 + (kc + rk)[None, :])
            y += _dot(r, v, PRECISE)
    else:
        if HAS_MAP:
            src = tl.load(srow_ptr + b * N2 + rr)
            v = tl.load(vt_ptr + src.to(tl.int64)[:, None] * M_PAD + rm[None, :], mask=(src >= 0)[:, None],
                        other=0.0)
        else:
            src = b * N2 + rr
            v = tl.load(vt_ptr + src.to(tl.int64)[:, None] * M_PAD + rm[None, :])
        y = v.to(tl.float32)
    return y


@triton.jit
def rot2_stats_kernel(
    vt_ptr, rot2t_ptr, srow_ptr, ocol_ptr, stats_ptr, M_PAD, post_scale,
    N2: tl.constexpr, KC: tl.constexpr, BLOCK_M: tl.constexpr, HAS_R2: tl.constexpr, HAS_MAP: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """stats[0, b, t] = min over block b of y[t, :], stats[1, b, t] = max."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    nb = tl.num_programs(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    y = _rot2_tile(vt_ptr, rot2t_ptr, srow_ptr, b, rm, M_PAD, N2, KC, BLOCK_M, HAS_R2, HAS_MAP, PRECISE) * post_scale
    if HAS_MAP:
        valid = (tl.load(ocol_ptr + b * N2 + tl.arange(0, N2)) >= 0)[:, None]
        lo = tl.min(tl.where(valid, y, float("inf")), axis=0)
        hi = tl.max(tl.where(valid, y, float("-inf")), axis=0)
    else:
        lo = tl.min(y, axis=0)
        hi = tl.max(y, axis=0)
    tl.store(stats_ptr + b * M_PAD + rm, lo)
    tl.store(stats_ptr + (nb + b) * M_PAD + rm, hi)


@triton.jit
def rot2_quant_kernel(
    vt_ptr, rot2t_ptr, srow_ptr, ocol_ptr, stats_ptr, out_ptr, scale_ptr, M, M_PAD, NB, stride_om,
    post_scale, clip, qmax,
    N2: tl.constexpr, KC: tl.constexpr, BLOCK_M: tl.constexpr, NB_PAD: tl.constexpr, HAS_R2: tl.constexpr, HAS_MAP: tl.constexpr,
    PRECISE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rb = tl.arange(0, NB_PAD)
    st = stats_ptr + rb[:, None] * M_PAD + rm[None, :]
    b_ok = (rb < NB)[:, None]
    row_min = tl.min(tl.load(st, mask=b_ok, other=float("inf")), axis=0)
    row_max = tl.max(tl.load(st + NB * M_PAD, mask=b_ok, other=float("-inf")), axis=0)
    scale, zero = asym_qparams(row_min, row_max, clip, qmax)
    m_ok = rm < M
    if b == 0:
        tl.store(scale_ptr + rm, scale, mask=m_ok)
    y = _rot2_tile(vt_ptr, rot2t_ptr, srow_ptr, b, rm, M_PAD, N2, KC, BLOCK_M, HAS_R2, HAS_MAP, PRECISE) * post_scale
    # centered_codes works on rows; here tokens are columns: transpose the tile once.
    a = centered_codes(tl.trans(y), scale, zero, qmax)  # [BLOCK_M, N2]
    rr = tl.arange(0, N2)
    if HAS_MAP:
        oc = tl.load(ocol_ptr + b * N2 + rr)
        ok = m_ok[:, None] & (oc >= 0)[None, :]
    else:
        oc = b * N2 + rr
        ok = m_ok[:, None]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + oc[None, :], a.to(out_ptr.dtype.element_ty), mask=ok)


_BUF: dict[tuple, torch.Tensor] = {}


def _buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Reused scratch (grows only): repeated calls and CUDA graphs allocate nothing."""
    key = (name, dtype, device)
    buf = _BUF.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _BUF[key] = buf
    return buf[:numel]


def default_block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 256 else 64)


def two_stage_quantize(x: torch.Tensor, n1: int, rot1: torch.Tensor | None, dest: torch.Tensor | None,
                       n2: int, rot2t: torch.Tensor | None, srow: torch.Tensor | None, ocol: torch.Tensor | None,
                       smooth: torch.Tensor | None, post_scale: float, bits: int, clip: float,
                       out_dtype: torch.dtype, precise: bool, block_m: int | None = None,
                       warps: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The three launches. x [M, K]; rot1 [n1, n1]; dest int32 [K] (scratch row of input
    channel c, None = identity); rot2t [n2, n2] = R̂₂ᵀ; srow/ocol int32 [NB·n2] (scratch row
    read and output column written by row r of output block b; −1 = padding; None =
    identity with NB·n2 = K). Returns (a [M, K] out_dtype, scale float32 [M])."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    bm = block_m or default_block_m(m)
    m_pad = triton.cdiv(max(m, 1), bm) * bm
    nb = (srow.numel() if srow is not None else k) // n2
    vt = _buffer("vt", k * m_pad, torch.float32 if precise else torch.bfloat16, x.device).view(k, m_pad)
    stats = _buffer("stats", 2 * nb * m_pad, torch.float32, x.device)
    out = torch.empty((m, k), dtype=out_dtype, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return out, scale
    dummy = scale
    w1, w2 = warps or (4, 4)
    grid_m = m_pad // bm
    rot1_scatter_kernel[(grid_m, k // n1)](
        x2, smooth if smooth is not None else dummy, rot1 if rot1 is not None else dummy,
        dest if dest is not None else dummy, vt, m, x2.stride(0), m_pad,
        N1=n1, BLOCK_M=bm, HAS_SMOOTH=smooth is not None, HAS_R1=rot1 is not None, HAS_DEST=dest is not None,
        PRECISE=precise, num_warps=w1,
    )
    has_map = srow is not None
    common = dict(N2=n2, KC=n2 if n2 <= 128 else 64, BLOCK_M=bm, HAS_R2=rot2t is not None, HAS_MAP=has_map,
                  PRECISE=precise, num_warps=w2)
    r2 = rot2t if rot2t is not None else dummy
    sr = srow if has_map else dummy
    oc = ocol if has_map else dummy
    rot2_stats_kernel[(grid_m, nb)](vt, r2, sr, oc, stats, m_pad, float(post_scale), **common)
    rot2_quant_kernel[(grid_m, nb)](
        vt, r2, sr, oc, stats, out, scale, m, m_pad, nb, out.stride(0), float(post_scale), float(clip),
        float((1 << bits) - 1), NB_PAD=max(2, triton.next_power_of_2(nb)), **common,
    )
    return out, scale


_PREP: dict[tuple, tuple] = {}


def _prepared(rot1, perm, rot2, smooth, precise):
    """Kernel-side copies of the transform factors, cached by identity (tensors of a model
    layer live for the model's life; the key holds data_ptr and version)."""
    key = tuple(None if t is None else (t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in
                (rot1, perm, rot2, smooth)) + (precise,)
    hit = _PREP.get(key)
    if hit is not None:
        return hit
    rdt = torch.float32 if precise else torch.bfloat16
    r1 = rot1.to(rdt).contiguous() if rot1 is not None else None
    r2t = rot2.t().to(rdt).contiguous() if rot2 is not None else None
    dest = None
    if perm is not None:  # v[:, j] = u[:, perm[j]]: input channel perm[j] goes to scratch row j
        dest = torch.empty_like(perm, dtype=torch.int32)
        dest[perm] = torch.arange(perm.numel(), device=perm.device, dtype=torch.int32)
    sm = smooth.to(torch.float32).contiguous() if smooth is not None else None
    if len(_PREP) > 512:
        _PREP.clear()
    _PREP[key] = (r1, r2t, dest, sm)
    return _PREP[key]


def duquant_quantize(x: torch.Tensor, rot1: torch.Tensor | None, perm: torch.Tensor | None,
                     rot2: torch.Tensor | None, smooth: torch.Tensor | None, bits: int = 4, clip: float = 0.9,
                     out_dtype: torch.dtype = torch.int8, precise: bool = False,
                     block_m: int | None = None, warps: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DuQuant transform + quantize. x [..., K] -> (a [M, K] out_dtype, scale float32 [M])."""
    k = x.shape[-1]
    rots = [r for r in (rot1, rot2) if r is not None]
    n = rots[0].shape[0] if rots else min(128, k & -k)
    if k % n or any(r.shape != (n, n) for r in rots) or n < 16:
        raise ValueError(f"rotation blocks {[tuple(r.shape) for r in rots]} do not tile K={k} (n ≥ 16)")
    r1, r2t, dest, sm = _prepared(rot1, perm, rot2, smooth, precise)
    return two_stage_quantize(x, n, r1, dest, n, r2t, None, None, sm, 1.0, bits, clip, out_dtype, precise,
                              block_m, warps)
