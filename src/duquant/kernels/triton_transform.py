"""Fused online transform + per-token asymmetric quantization (v3: one launch).

Both online transforms of the package are "block rotation → channel shuffle → block
rotation" per token row:
  * DuQuant: x/smooth · R̂₁ (n×n blocks) → permute → · R̂₂ (n×n blocks);
  * QuaRot's Hadamard H_K = H_A ⊗ H_n (A = K/n): x · (I_A ⊗ H_n) → transpose the [A, n]
    view of the row → · (I_n ⊗ H_A) → transpose back (see `triton_hadamard`).
The shuffle mixes all blocks, so no program that owns a slice of K can finish a row.
v1 kept whole rows in one program (latency-bound: 170 µs at M = 2048, K = 4096). v2 ran
three launches of (token tile × block) programs:
  A. u = (x/smooth)·R̂₁ for one [BLOCK_M, n] tile, stored *token-minor* into a scratch
     vT [K, M_pad] at row dest[c] (dest = inverse permutation): the shuffle happens on
     the store, and each stored row segment is BLOCK_M contiguous tokens (a full
     128-byte line at BLOCK_M = 64, bf16).
  B. a tile [N2, BLOCK_M] of vT (contiguous rows), yᵀ = R̂₂ᵀ·vT_tile, per-token partial
     min/max written to stats [K/N2, M_pad] (tiny).
  C. the same tile and product again, the per-token min/max reduced from the stats, and
     the centered codes stored.
On the H100 v2 took 64 µs of GPU time (M = 2048, K = 4096) and ~90 µs per eager call:
three Triton launches cost more host time than the GPU work, and stage C re-read vT.
v3 runs the same three stages in one launch: the programs of one token tile meet at a
global counter between the stages (`transform_quant_kernel`), and y stays in registers
from stage B to stage C. The three-launch form is kept (STAGE = 1, 2, 3) for the CPU
interpreter and as a fallback (DUQUANT_FUSED_TRANSFORM=0).
Numerics: fast mode feeds the tensor cores bf16 (R̂ and x/smooth rounded to bf16, u
stored as bf16, fp32 accumulation); precise mode keeps u in float32 and runs the
products as 3×TF32 (≈ fp32).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from duquant.kernels.dependent_launch import pdl_supported
from duquant.kernels.norm import InputNorm, check_one_fused_op
from duquant.kernels.tensor_cache import TensorKeyedCache
from duquant.kernels.triton_fused_input import rms_normalized, row_rms_inverse, swiglu_rounded
from duquant.kernels.triton_quant import centered_codes, reciprocal_codes, token_qparams


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
def _rot1_store(x_ptr, smooth_ptr, r1, dest_ptr, vt_ptr, c, rm, store_ok, M, stride_xm, M_PAD,
                norm_w_ptr, rinv_ptr, up_ptr,
                N1: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr, HAS_DEST: tl.constexpr,
                PRECISE: tl.constexpr, HAS_NORM: tl.constexpr, NORM_W: tl.constexpr, GATED: tl.constexpr):
    """vT[dest[c·N1 + j], rm[i]] = ((x·w/smooth)[rm[i], block c] · R̂₁)[i, j]; r1 is the loaded R̂₁.
    HAS_NORM (a fused RMSNorm): x becomes the model's RMSNorm output, from the token's
    1/rms (rinv, a pass before this kernel) and the norm weight w (NORM_W), rounded as the
    model rounds it (`triton_fused_input`).
    GATED (SwiGLU, the down_proj input): x is the gate projection and the transform's
    input is silu(x)·up, rounded as the model rounds it (up has x's strides)."""
    rn = tl.arange(0, N1)
    cols = c * N1 + rn
    offs = rm.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    # Padding tokens (rm ≥ M) read 1, not 0: IEEE division (div_rn, here and in the
    # quantizer) takes a slow path when the quotient is 0, and a zero row made every later
    # division of its tile slow (H100: M = 1 padded to 16 cost 24 µs, 16 real tokens 14 µs;
    # scripts/transform_small_m.py). Padding rows are never stored.
    h = tl.load(x_ptr + offs, mask=(rm < M)[:, None], other=1.0)
    h = h.to(tl.float32)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    if GATED:
        h = swiglu_rounded(h, tl.load(up_ptr + offs, mask=(rm < M)[:, None], other=1.0).to(tl.float32), DT)
    if HAS_NORM:
        rinv = tl.load(rinv_ptr + rm, mask=rm < M, other=1.0)[:, None]
        w = tl.load(norm_w_ptr + cols)[None, :] if NORM_W else 0.0
        h = rms_normalized(h, rinv, w, DT, norm_w_ptr.dtype.element_ty, NORM_W)
    if HAS_SMOOTH:
        h = tl.math.div_rn(h, tl.load(smooth_ptr + cols)[None, :])
    if HAS_R1:
        h = _dot(h, r1, PRECISE)
    if HAS_DEST:
        rows = tl.load(dest_ptr + cols)
    else:
        rows = cols
    # token-minor: one stored segment = BLOCK_M consecutive tokens of one channel
    tl.store(vt_ptr + rows.to(tl.int64)[None, :] * M_PAD + rm[:, None], h.to(vt_ptr.dtype.element_ty),
             mask=store_ok)


@triton.jit
def _load_vt_rows(vt_ptr, srow_ptr, idx, rm, M_PAD, HAS_MAP: tl.constexpr):
    """vT rows for rows `idx` of the output blocks (through the srow map when there is one;
    map entries < 0 read as 0), tokens rm. vT was written by other programs: ".cg" loads
    skip the SM's (non-coherent) L1."""
    if HAS_MAP:
        src = tl.load(srow_ptr + idx)
        v = tl.load(vt_ptr + src.to(tl.int64)[:, None] * M_PAD + rm[None, :], mask=(src >= 0)[:, None], other=0.0,
                    cache_modifier=".cg")
    else:
        v = tl.load(vt_ptr + idx.to(tl.int64)[:, None] * M_PAD + rm[None, :], cache_modifier=".cg")
    return v


@triton.jit
def _rot2_tile(vt_ptr, rot2t_ptr, r2, srow_ptr, b, rm, M_PAD, N2: tl.constexpr, KC: tl.constexpr,
               BLOCK_M: tl.constexpr, HAS_R2: tl.constexpr, HAS_MAP: tl.constexpr, PRECISE: tl.constexpr):
    """yᵀ [N2, BLOCK_M] = R̂₂ᵀ · vT[rows of output block b, tokens rm].
    KC = N2: r2 is R̂₂ᵀ, loaded once by the caller. KC < N2 (N2 = 256): the product runs in
    KC-wide slices of the reduction, read here, so no program holds a 256×256 operand."""
    rr = tl.arange(0, N2)
    if HAS_R2:
        if KC == N2:
            y = _dot(r2, _load_vt_rows(vt_ptr, srow_ptr, b * N2 + rr, rm, M_PAD, HAS_MAP), PRECISE)
        else:
            y = tl.zeros([N2, BLOCK_M], dtype=tl.float32)
            rk = tl.arange(0, KC)
            for kc in tl.static_range(0, N2, KC):
                v = _load_vt_rows(vt_ptr, srow_ptr, b * N2 + kc + rk, rm, M_PAD, HAS_MAP)
                r = tl.load(rot2t_ptr + rr[:, None] * N2 + (kc + rk)[None, :])
                y += _dot(r, v, PRECISE)
    else:
        y = _load_vt_rows(vt_ptr, srow_ptr, b * N2 + rr, rm, M_PAD, HAS_MAP).to(tl.float32)
    return y


@triton.jit
def _arrive_and_wait(counter_ptr, target):
    """Barrier among the programs of one token group (all resident at once: see
    `transform_quant_kernel`). The counter only grows within a launch; the bounded spin
    turns a broken residency assumption into wrong codes (caught by the parity tests)
    instead of a hung GPU."""
    tl.debug_barrier()  # every thread's stores are issued before this program arrives
    seen = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") + 1
    spins = 0
    while (seen < target) & (spins < 4_000_000):
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()


@triton.jit
def transform_quant_kernel(
    x_ptr, smooth_ptr, rot1_ptr, dest_ptr, vt_ptr, rot2t_ptr, srow_ptr, ocol_ptr, rowmin_ptr, rowmax_ptr, out_ptr,
    scale_ptr, sync_ptr, norm_w_ptr, rinv_ptr, up_ptr, M, stride_xm, M_PAD, NA, NB, P, stride_om, post_scale,
    clip, qmax,
    N1: tl.constexpr, N2: tl.constexpr, KC: tl.constexpr, BLOCK_M: tl.constexpr, SUB: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr, HAS_DEST: tl.constexpr, HAS_R2: tl.constexpr,
    HAS_MAP: tl.constexpr, PRECISE: tl.constexpr, STAGE: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_NORM: tl.constexpr, NORM_W: tl.constexpr, GATED: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr = False,
    RECIP: tl.constexpr = False,
):
    """One program = one block × one token group of SUB·BLOCK_M tokens (the rotation is
    read once per program and used for SUB token tiles; on the H100 SUB > 1 did not pay,
    see DEFAULT_SUB_TILES). The three stages:
      1. u = (x/smooth)·R̂₁ for input block b, stored token-minor at the permuted rows of vT;
      2. y = R̂₂ᵀ·vT for output block b; per-token min/max of the block merged into
         rowmin/rowmax with float atomics (stage 1 initialises them);
      3. scale/zero from rowmin/rowmax, y again (one more L2 read of vT), centered codes.
    STAGE 1/2/3 runs one stage per launch (the CPU interpreter runs programs one after
    another, so it needs this form). STAGE 0 runs all three in one launch (fewer host
    launches: small M): the P programs of a token group meet at a counter between the
    stages. Programs take their (group, block) from a ticket counter in the order they
    start, so a waiting program's earlier tickets are all running and the rest start as
    soon as any earlier group ends: no deadlock while P programs fit on the GPU at once,
    which the host guarantees by launching this form only for P ≤ SMs. The last program
    of a group resets its counter and the last program of the launch the ticket, so the
    next launch (or CUDA graph replay) finds zeros.
    HAS_NORM fuses the RMSNorm that produces x: stage 1 normalises its block with the
    token's 1/rms, which `triton_fused_input.row_rms_inverse` wrote before this launch (a
    block never sees the whole row; session 11 summed Σx² across blocks here and left 1/rms
    for the scale, which skipped the model's rounding of the normalised row).
    LAUNCH_DEPENDENTS (the launch that writes the codes): a decode GEMV launched after this
    one with PDL may start now (`dependent_launch`); it waits for this grid's end before
    reading the codes. The GEMV starts only once every program here has started, so the
    barriers above never wait for a program that has no room."""
    if LAUNCH_DEPENDENTS and (STAGE == 0 or STAGE == 3):
        gdc_launch_dependents()
    if STAGE == 0:
        ticket = tl.atomic_add(sync_ptr, 1)
        g = ticket // P
        b = ticket % P
        group_counter = sync_ptr + 2 + g
    else:
        b = tl.program_id(0)
        g = tl.program_id(1)
    m0 = g * (SUB * BLOCK_M)
    if STAGE == 0 or STAGE == 1:
        ba = tl.minimum(b, NA - 1)  # programs past the last input block only take part in the barriers
        rn = tl.arange(0, N1)
        r1 = tl.load(rot1_ptr + rn[:, None] * N1 + rn[None, :]) if HAS_R1 else 0.0
        for sub in range(SUB):
            rm = m0 + sub * BLOCK_M + tl.arange(0, BLOCK_M)
            _rot1_store(x_ptr, smooth_ptr, r1, dest_ptr, vt_ptr, ba, rm, b < NA, M, stride_xm, M_PAD,
                        norm_w_ptr, rinv_ptr, up_ptr, N1, HAS_SMOOTH, HAS_R1, HAS_DEST, PRECISE, HAS_NORM, NORM_W,
                        GATED)
            if b == 0:
                tl.store(rowmin_ptr + rm, tl.full([BLOCK_M], float("inf"), tl.float32))
                tl.store(rowmax_ptr + rm, tl.full([BLOCK_M], float("-inf"), tl.float32))
    if STAGE == 0:
        _arrive_and_wait(group_counter, P)
    bb = tl.minimum(b, NB - 1)
    rr = tl.arange(0, N2)
    if HAS_R2 and KC == N2:
        r2 = tl.load(rot2t_ptr + rr[:, None] * N2 + rr[None, :])
    else:
        r2 = 0.0
    if HAS_MAP:
        oc = tl.load(ocol_ptr + bb * N2 + rr)
        valid = oc >= 0
    else:
        oc = bb * N2 + rr
        valid = rr >= 0
    if STAGE == 0 or STAGE == 2:
        for sub in range(SUB):
            rm = m0 + sub * BLOCK_M + tl.arange(0, BLOCK_M)
            y = _rot2_tile(vt_ptr, rot2t_ptr, r2, srow_ptr, bb, rm, M_PAD, N2, KC, BLOCK_M, HAS_R2, HAS_MAP, PRECISE)
            y = y * post_scale
            lo = tl.min(tl.where(valid[:, None], y, float("inf")), axis=0)
            hi = tl.max(tl.where(valid[:, None], y, float("-inf")), axis=0)
            b_ok = tl.full([BLOCK_M], 1, tl.int1) & (b < NB)
            tl.atomic_min(rowmin_ptr + rm, lo, mask=b_ok, sem="relaxed")
            tl.atomic_max(rowmax_ptr + rm, hi, mask=b_ok, sem="relaxed")
    if STAGE == 0:
        _arrive_and_wait(group_counter, 2 * P)
    if STAGE == 0 or STAGE == 3:
        for sub in range(SUB):
            rm = m0 + sub * BLOCK_M + tl.arange(0, BLOCK_M)
            y = _rot2_tile(vt_ptr, rot2t_ptr, r2, srow_ptr, bb, rm, M_PAD, N2, KC, BLOCK_M, HAS_R2, HAS_MAP, PRECISE)
            y = y * post_scale
            row_min = tl.load(rowmin_ptr + rm, cache_modifier=".cg")
            row_max = tl.load(rowmax_ptr + rm, cache_modifier=".cg")
            scale, zero = token_qparams(row_min, row_max, clip, qmax, SYMMETRIC)
            m_ok = rm < M
            if b == 0:
                tl.store(scale_ptr + rm, scale, mask=m_ok)
            # centered_codes works on rows; here tokens are columns: transpose the tile once.
            a = centered_codes(tl.trans(y), scale, zero, qmax, RECIP)  # [BLOCK_M, N2]
            ok = m_ok[:, None] & valid[None, :] & (b < NB)
            tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_om + oc[None, :], a.to(out_ptr.dtype.element_ty),
                     mask=ok)
    if STAGE == 0:
        if tl.atomic_add(group_counter, 1) == 3 * P - 1:  # the group's last program: nobody waits any more
            tl.atomic_xchg(group_counter, 0)
        if tl.atomic_add(sync_ptr + 1, 1) == tl.num_programs(0) - 1:  # every ticket has been taken
            tl.atomic_xchg(sync_ptr, 0)
            tl.atomic_xchg(sync_ptr + 1, 0)


_BUF: dict[tuple, torch.Tensor] = {}


def _buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Reused scratch (grows only): repeated calls and CUDA graphs allocate nothing."""
    key = (name, dtype, device)
    buf = _BUF.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _BUF[key] = buf
    return buf[:numel]


def _zeroed_buffer(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch that every launch leaves zeroed again (so it is zero-filled only when it grows)."""
    key = (name, dtype, device)
    buf = _BUF.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(max(numel, 64), dtype=dtype, device=device)
        _BUF[key] = buf
    return buf


def _sync_counters(tiles: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 [2 + tiles] (ticket, done, one counter per token group) for the one-launch path."""
    return _zeroed_buffer("sync", 2 + tiles, torch.int32, device)


def default_block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 256 else 64)


# Token tiles per program (the rotation is read once per program). Measured on the H100
# at M = 2048 (results/kernels/NOTES.md, v3): 1 is fastest (53 µs at K = 4096; 2/4/8:
# 65/60/91 µs), so the L2 re-reads of R̂ were not the limit; the option stays for tuning.
DEFAULT_SUB_TILES = 1


# Largest M that takes the one-launch form by default. H100 (scripts/transform_timing.py,
# results/kernels/NOTES.md): the one-launch form costs more GPU time (71 vs 54 µs at
# M = 2048, K = 4096; about equal at M = 8192) but ~50 µs less host time per call (two
# Triton launches fewer), and a prefill of one 2048-token sequence is host-bound.
FUSED_MAX_M = 8192


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fused_default(x: torch.Tensor, m: int, programs: int) -> bool:
    """One launch up to FUSED_MAX_M tokens on a GPU, three launches above and inside CUDA
    graph captures (less GPU time when the GPU, not the host, is the limit). The interpreter (serial programs) always
    needs three. DUQUANT_FUSED_TRANSFORM=0/1 forces one choice.

    The one-launch form needs the `programs` of a token group resident at once; at least
    one program fits on every SM (or the kernel could not launch at all), so it is used
    only when programs ≤ SMs (86 of 132 on an H100 at K = 11008; a Hadamard plan of 172
    blocks, or a small GPU, takes three launches)."""
    if not x.is_cuda or _INTERPRET.value or programs > _sm_count(x.device):
        return False
    forced = os.environ.get("DUQUANT_FUSED_TRANSFORM")
    if forced in ("0", "1"):
        return forced == "1"
    # Inside a CUDA graph capture, launches cost no host time at replay: take the form with
    # less GPU time, three launches (H100 graph times at K = 4096: 10.6 vs 13.7 µs at M = 16,
    # 54 vs 71 µs at M = 2048; results/kernels/NOTES.md, session 5).
    return m <= FUSED_MAX_M and not torch.cuda.is_current_stream_capturing()


_THREE_LAUNCH_RUN: set[tuple] = set()


def _three_launch_compiled(x: torch.Tensor, m: int, meta: dict) -> bool:
    """False the first time a kernel configuration (and M, K) comes by outside a CUDA-graph
    capture: that call then runs the three-launch form, so that a capture later (which takes
    three launches) finds its kernels compiled and loaded. On the H100 (session 7) a capture
    whose three-launch kernels had never run before was invalidated at their launch;
    compiling inside the capture is the suspected cause (other captures found theirs in
    Triton's disk cache)."""
    key = (x.device, m, x.shape[-1], *meta.values())  # meta is always built in one key order
    if key in _THREE_LAUNCH_RUN or not x.is_cuda or torch.cuda.is_current_stream_capturing():
        return True
    _THREE_LAUNCH_RUN.add(key)
    return False


def token_rows_and_outputs(x: torch.Tensor, out_dtype: torch.dtype, up: torch.Tensor | None = None,
                           norm: InputNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                                                    torch.Tensor]:
    """What every transform kernel's host code starts with: x as a row-contiguous [M, K]
    view, the SwiGLU `up` (None: none) as [M, K] with x's strides (the kernels read both
    with x's), and the empty codes [M, K] and scales [M]. Checks that at most one op is fused."""
    check_one_fused_op(norm, up)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    up2 = None
    if up is not None:
        if up.shape != x.shape:
            raise ValueError(f"gate {tuple(x.shape)} and up {tuple(up.shape)} differ")
        up2 = up.reshape(-1, k)
        if up2.stride() != x2.stride():
            x2, up2 = x2.contiguous(), up2.contiguous()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
        up2 = None if up2 is None else up2.contiguous()
    m = x2.shape[0]
    return (x2, up2, torch.empty((m, k), dtype=out_dtype, device=x.device),
            torch.empty((m,), dtype=torch.float32, device=x.device))


def rotation_block(k: int, rot1: torch.Tensor | None, rot2: torch.Tensor | None) -> int:
    """Block size n of a DuQuant transform over K channels (checked: n | K, n ≥ 16)."""
    rots = [r for r in (rot1, rot2) if r is not None]
    n = rots[0].shape[0] if rots else min(128, k & -k)
    if k % n or any(r.shape != (n, n) for r in rots) or n < 16:
        raise ValueError(f"rotation blocks {[tuple(r.shape) for r in rots]} do not tile K={k} (n ≥ 16)")
    return n


def two_stage_quantize(x: torch.Tensor, n1: int, rot1: torch.Tensor | None, dest: torch.Tensor | None,
                       n2: int, rot2t: torch.Tensor | None, srow: torch.Tensor | None, ocol: torch.Tensor | None,
                       smooth: torch.Tensor | None, post_scale: float, bits: int, clip: float,
                       out_dtype: torch.dtype, precise: bool, block_m: int | None = None,
                       warps: int | None = None, fused: bool | None = None,
                       sub_tiles: int | None = None, symmetric: bool = False,
                       norm: InputNorm | None = None, up: torch.Tensor | None = None,
                       fast_quant: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block rotation → shuffle → block rotation → per-token quantization (asymmetric, or
    symmetric with z = 2^(b−1)); with `norm`, of RMSNorm(x); with `up`, of silu(x)·up
    (both fused: see the kernel).

    x [M, K]; rot1 [n1, n1]; dest int32 [K] (scratch row of input channel c, None =
    identity); rot2t [n2, n2] = R̂₂ᵀ; srow/ocol int32 [NB·n2] (scratch row read and output
    column written by row r of output block b; −1 = padding; None = identity with
    NB·n2 = K). fused: one launch or three (default: `fused_default`). Returns
    (a [M, K] out_dtype, scale float32 [M])."""
    k = x.shape[-1]
    x2, up2, out, scale = token_rows_and_outputs(x, out_dtype, up, norm)
    m = x2.shape[0]
    if m == 0:
        return out, scale
    na = k // n1
    nb = (srow.numel() if srow is not None else k) // n2
    programs = max(na, nb)
    bm = block_m or default_block_m(m)
    sub = sub_tiles or DEFAULT_SUB_TILES
    group = bm * sub
    m_pad = triton.cdiv(m, group) * group
    groups = m_pad // group
    has_map = srow is not None
    vt = _buffer("vt", k * m_pad, torch.float32 if precise else torch.bfloat16, x.device).view(k, m_pad)
    row_range = _buffer("row_range", 2 * m_pad, torch.float32, x.device)
    norm_w = None if norm is None or norm.weight is None else norm.weight.contiguous()
    meta = dict(N1=n1, N2=n2, KC=n2 if n2 <= 128 else 64, BLOCK_M=bm, SUB=sub,
                HAS_SMOOTH=smooth is not None, HAS_R1=rot1 is not None, HAS_DEST=dest is not None,
                HAS_R2=rot2t is not None, HAS_MAP=has_map, PRECISE=precise, SYMMETRIC=symmetric,
                HAS_NORM=norm is not None, NORM_W=norm_w is not None, GATED=up2 is not None,
                LAUNCH_DEPENDENTS=pdl_supported(x.device), RECIP=reciprocal_codes(precise, fast_quant),
                num_warps=warps or 4)
    if fused is None:
        # precise (fp32 vT, 3×TF32) in one launch can exceed shared memory (K = 11008)
        fused = fused_default(x, m, programs) and not precise and _three_launch_compiled(x, m, meta)
    if fused and x.is_cuda and programs > _sm_count(x.device):
        raise ValueError(f"one-launch transform: {programs} programs per token group exceed the GPU's "
                         f"{_sm_count(x.device)} SMs (they must be resident at once); use fused=False")
    dummy = scale
    args = (x2, smooth if smooth is not None else dummy, rot1 if rot1 is not None else dummy,
            dest if dest is not None else dummy, vt, rot2t if rot2t is not None else dummy,
            srow if has_map else dummy, ocol if has_map else dummy, row_range[:m_pad], row_range[m_pad:], out, scale,
            _sync_counters(groups, x.device) if fused else dummy,
            norm_w if norm_w is not None else dummy,
            row_rms_inverse(x2, norm.eps, _buffer("rinv", m, torch.float32, x.device)) if norm is not None else dummy,
            up2 if up2 is not None else dummy,
            m, x2.stride(0), m_pad, na, nb, programs, out.stride(0), float(post_scale), float(clip),
            float((1 << bits) - 1))
    if fused:
        transform_quant_kernel[(groups * programs,)](*args, STAGE=0, **meta)
    else:
        for stage in (1, 2, 3):
            transform_quant_kernel[(programs, groups)](*args, STAGE=stage, **meta)
    return out, scale


class Factors(NamedTuple):
    """Kernel-side copies of one transform's factors (rotations in the operand dtype)."""
    rot1: torch.Tensor | None
    rot2: torch.Tensor | None
    rot2_t: torch.Tensor | None  # R̂₂ᵀ, as the tiles kernel reads it
    dest: torch.Tensor | None  # int32 inverse permutation: input channel c goes to row dest[c]
    perm: torch.Tensor | None  # int32 permutation: row j reads input channel perm[j]
    smooth: torch.Tensor | None


_PREP = TensorKeyedCache()


def prepared_factors(rot1, perm, rot2, smooth, precise) -> Factors:
    """`Factors` of a transform, cached for as long as these very tensors live unchanged
    (`TensorKeyedCache`: a model layer's factors are prepared once)."""
    return _PREP.get((rot1, perm, rot2, smooth), precise, lambda: _prepare(rot1, perm, rot2, smooth, precise))


def _prepare(rot1, perm, rot2, smooth, precise) -> Factors:
    rdt = torch.float32 if precise else torch.bfloat16
    dest = perm32 = None
    if perm is not None:  # v[:, j] = u[:, perm[j]]: input channel perm[j] goes to scratch row j
        perm32 = perm.to(torch.int32).contiguous()
        dest = torch.empty_like(perm32)
        dest[perm] = torch.arange(perm.numel(), device=perm.device, dtype=torch.int32)
    return Factors(
        rot1.to(rdt).contiguous() if rot1 is not None else None,
        rot2.to(rdt).contiguous() if rot2 is not None else None,
        rot2.t().to(rdt).contiguous() if rot2 is not None else None,
        dest, perm32, smooth.to(torch.float32).contiguous() if smooth is not None else None)


def duquant_quantize(x: torch.Tensor, rot1: torch.Tensor | None, perm: torch.Tensor | None,
                     rot2: torch.Tensor | None, smooth: torch.Tensor | None, bits: int = 4, clip: float = 0.9,
                     out_dtype: torch.dtype = torch.int8, precise: bool = False, block_m: int | None = None,
                     warps: int | None = None, fused: bool | None = None, sub_tiles: int | None = None,
                     symmetric: bool = False, norm: InputNorm | None = None,
                     up: torch.Tensor | None = None, fast_quant: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DuQuant transform + quantize (of RMSNorm(x) with `norm`, of silu(x)·up with `up`).
    x [..., K] -> (a [M, K] out_dtype, scale float32 [M])."""
    n = rotation_block(x.shape[-1], rot1, rot2)
    f = prepared_factors(rot1, perm, rot2, smooth, precise)
    return two_stage_quantize(x, n, f.rot1, f.dest, n, f.rot2_t, None, None, f.smooth, 1.0, bits, clip, out_dtype,
                              precise, block_m, warps, fused, sub_tiles, symmetric, norm, up, fast_quant)
