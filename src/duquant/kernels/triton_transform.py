"""Fused DuQuant online transform + per-token asymmetric quantization (one kernel).

x [M, K] bf16 -> smooth -> R1 (same n×n block on every n columns) -> permute columns ->
R2 (n×n blocks) -> per-token asymmetric `bits`-bit codes; out: a = q − z (int8 or e4m3)
and the per-token scale (float32).

Why this shape. The permutation mixes all blocks (DuQuant's zigzag spreads outlier
channels over every block), so composing R1·P·R2 gives a dense K×K matrix (K/n times the
work), and a global gather from the bf16 input is uncoalesced. Instead each program owns
BLOCK_M whole token rows and:
  1. streams x once from HBM, computes u = (x/smooth)·R1 block by block on tensor cores
     and writes u to a per-program scratch slot laid out token-minor ([K, BLOCK_M]), so
     that one column of u for all BLOCK_M tokens is one contiguous 32-64 byte sector;
  2. reads u back in permuted column order (whole sectors, from L1/L2: the slot is small
     and was just written by this program), applies R2 block by block and keeps only the
     running per-token min/max;
  3. repeats step 2 and quantizes with the now known per-token scale/zero.
Recomputing step 2 costs one more L2 read and one small MMA per block, cheaper than a
float32 round trip of y. The grid is persistent (≤ a few programs per SM) so the scratch
(grid · K · BLOCK_M elements) stays L2-resident. The permutation is thus an on-chip
(L1/L2) shuffle, never an HBM gather.
Numerics: fast mode feeds the tensor cores bf16 (R1, R2, x/smooth and u rounded to bf16,
fp32 accumulation); precise mode keeps float32 operands with TF32 products (10-bit mantissa).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from duquant.kernels.triton_quant import asym_qparams, centered_codes


@triton.jit
def _load_v_block(slot, perm_ptr, b, rm, rn, N_BLK: tl.constexpr, BLOCK_M: tl.constexpr, HAS_PERM: tl.constexpr):
    """Columns b·n .. b·n+n−1 of v = u[:, perm] as a [BLOCK_M, n] float32 tile."""
    cols = b * N_BLK + rn
    if HAS_PERM:
        cols = tl.load(perm_ptr + cols).to(tl.int32)
    return tl.load(slot + cols[None, :] * BLOCK_M + rm[:, None]).to(tl.float32)


@triton.jit
def _rotate(v, rot, HAS_ROT: tl.constexpr, PRECISE: tl.constexpr):
    if HAS_ROT:
        if PRECISE:
            v = tl.dot(v, rot, input_precision="tf32")
        else:
            v = tl.dot(v.to(tl.bfloat16), rot)
    return v


@triton.jit
def duquant_quant_kernel(
    x_ptr, smooth_ptr, rot1_ptr, perm_ptr, rot2_ptr, scratch_ptr, out_ptr, scale_ptr,
    M, K, stride_xm, stride_om, tiles_per_prog, nprog, clip, qmax,
    N_BLK: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr, HAS_PERM: tl.constexpr, HAS_R2: tl.constexpr,
    PRECISE: tl.constexpr,
):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, N_BLK)
    # The rotations stay on chip for the whole program (loop-invariant loads).
    r1 = None
    r2 = None
    if HAS_R1:
        r1 = tl.load(rot1_ptr + rn[:, None] * N_BLK + rn[None, :])
    if HAS_R2:
        r2 = tl.load(rot2_ptr + rn[:, None] * N_BLK + rn[None, :])
    slot = scratch_ptr + pid.to(tl.int64) * K * BLOCK_M
    n_blocks = K // N_BLK
    for i in range(0, tiles_per_prog):
        rows = (pid + i * nprog) * BLOCK_M + rm  # past the last tile: all rows masked
        row_ok = rows < M
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        # 1. u = (x / smooth) · R1, written token-minor into this program's slot.
        for b in range(n_blocks):
            cols = b * N_BLK + rn
            h = tl.load(x_rows + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                h = tl.math.div_rn(h, tl.load(smooth_ptr + cols)[None, :])
            u = _rotate(h, r1, HAS_R1, PRECISE)
            tl.store(slot + cols[None, :] * BLOCK_M + rm[:, None], u.to(scratch_ptr.dtype.element_ty))
        tl.debug_barrier()  # the slot is read below by other threads of this program
        # 2. per-token min/max of y = v · R2.
        row_min = tl.full([BLOCK_M], float("inf"), tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for b in range(n_blocks):
            y = _rotate(_load_v_block(slot, perm_ptr, b, rm, rn, N_BLK, BLOCK_M, HAS_PERM), r2, HAS_R2, PRECISE)
            row_min = tl.minimum(row_min, tl.min(y, axis=1))
            row_max = tl.maximum(row_max, tl.max(y, axis=1))
        scale, zero = asym_qparams(row_min, row_max, clip, qmax)
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        # 3. recompute y and write the centered codes.
        o_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_om
        for b in range(n_blocks):
            y = _rotate(_load_v_block(slot, perm_ptr, b, rm, rn, N_BLK, BLOCK_M, HAS_PERM), r2, HAS_R2, PRECISE)
            a = centered_codes(y, scale, zero, qmax)
            tl.store(o_rows + (b * N_BLK + rn)[None, :], a.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.debug_barrier()  # the next tile overwrites the slot


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Reused scratch buffer (grows only), so repeated calls (and CUDA graphs) allocate nothing."""
    key = (dtype, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _SCRATCH[key] = buf
    return buf


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def duquant_quantize(x: torch.Tensor, rot1: torch.Tensor | None, perm: torch.Tensor | None,
                     rot2: torch.Tensor | None, smooth: torch.Tensor | None, bits: int = 4, clip: float = 0.9,
                     out_dtype: torch.dtype = torch.int8, precise: bool = False,
                     block_m: int = 16, programs_per_sm: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel. x [..., K] -> (a [M, K] out_dtype, scale float32 [M])."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    rots = [r for r in (rot1, rot2) if r is not None]
    n_blk = rots[0].shape[0] if rots else min(128, k & -k)
    if k % n_blk or any(r.shape != (n_blk, n_blk) for r in rots):
        raise ValueError(f"rotation blocks {[tuple(r.shape) for r in rots]} do not tile K={k}")
    rot_dtype = torch.float32 if precise else torch.bfloat16
    r1 = rot1.to(rot_dtype).contiguous() if rot1 is not None else None
    r2 = rot2.to(rot_dtype).contiguous() if rot2 is not None else None
    sm = smooth.to(torch.float32).contiguous() if smooth is not None else None
    pm = perm.contiguous() if perm is not None else None
    out = torch.empty((m, k), dtype=out_dtype, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    n_tiles = triton.cdiv(m, block_m)
    grid = max(1, min(n_tiles, programs_per_sm * _num_sms(x.device)))
    scratch = _scratch(grid * k * block_m, torch.float32 if precise else torch.bfloat16, x.device)
    dummy = out  # stands in for absent optional pointers (never read)
    duquant_quant_kernel[(grid,)](
        x2, sm if sm is not None else dummy, r1 if r1 is not None else dummy, pm if pm is not None else dummy,
        r2 if r2 is not None else dummy, scratch, out, scale,
        m, k, x2.stride(0), out.stride(0), triton.cdiv(n_tiles, grid), grid, float(clip), float((1 << bits) - 1),
        N_BLK=n_blk, BLOCK_M=block_m, HAS_SMOOTH=sm is not None, HAS_R1=r1 is not None,
        HAS_PERM=pm is not None, HAS_R2=r2 is not None, PRECISE=precise,
        num_warps=4 if n_blk <= 64 else 8,
    )
    return out, scale
