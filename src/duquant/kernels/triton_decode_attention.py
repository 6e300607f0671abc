"""Decode attention straight from a 4-bit KV cache (split-K "flash decoding").

One new token per sequence attends over the cache of `StaticQuantizedKVCache`: packed K and V
codes with one float32 scale and zero point per (token, head) row. Dequantizing the whole cache
to BF16 and running SDPA reads the codes, writes 4× their bytes and reads those again, 2.25× the
traffic of a BF16 cache; this kernel reads the codes once, about 0.3× (codes + 8 bytes of scale
and zero per 64 bytes of 128 codes).

Stage 1, one program per (sequence, query head, split of the positions): for tiles of BLOCK_N
positions, scores q·k · scaling where the boolean mask allows (else −inf), an online softmax, and
the V sum; it writes its running max, its sum of exponentials and its unnormalised output. Stage
2 merges the splits of each (sequence, head). Grouped-query attention: query head h reads KV head
h // (Hq / Hkv).

The codes are never dequantized element by element (session 12, `_attend_tile` FOLD and DOT):
each row's scale s and zero z come out of the sums, q·((c − z)·s) = s·(q·c − z·Σq) and
Σ p·(c − z)·s = Σ (p·s)·c − Σ p·s·z, and both sums over codes run on the tensor cores with the
query (in its dtype) or the probabilities (fp16) padded to 16 MMA rows. H100, 7B shapes, 2048-token cache
(results/kernels/session12/decode_attention.md): batch 1 / 16 / 64 21.7 / 247 / 932 µs with
session 10's per-element dequantization, 18.6 / 178 / 657 µs now (BF16 SDPA over a BF16 cache:
17.6 / 185 / 705); still ~3.5× the bytes floor of the codes.

Grouped-query attention (session 13, `decode_attention_group_kernel`): the G query heads of a KV
head fill the MMA rows that were padding, one program per KV head, so each K/V tile is read and
unpacked once per group instead of G times (results/kernels/session13/decode_attention.md, µs at
batch 1 / 4 / 16 / 64): LLaMA-3-8B's 32/8 heads × 128 18.7 / 51.2 / 174 / 637 → 7.7 / 19.2 / 56.7 /
194 (BF16 SDPA 12.8 / 18.0 / 54.8 / 187); SmolLM2's 9/3 × 64 → 6.1 / 7.5 / 14.1 / 55.4 (SDPA 10.7 /
12.1 / 15.9 / 44.3). Numerics: float32 but for p·s
rounded to fp16 (SDPA's flash kernel rounds its probabilities to BF16) and K and V not rounded
to the model dtype: expect differences of that order from the reference path, not bit equality.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from duquant.kernels.triton_fake_quant import _INTERPRET
from duquant.kernels.triton_kv_quant import unpack_nibbles

BLOCK_N = 64  # positions per tile


@triton.jit
def _dequantized_tile(codes_ptr, scale_ptr, zero_ptr, row0, pos, pos_ok, D: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Rows row0 + pos of a packed cache tensor as [BLOCK_N, D] float32 values (model-dtype rounded)."""
    half = tl.arange(0, D // 2)
    rows = row0 + pos.to(tl.int64)
    packed = tl.load(codes_ptr + rows[:, None] * (D // 2) + half[None, :], mask=pos_ok[:, None], other=0)
    codes = unpack_nibbles(packed, pos.shape[0], D).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=pos_ok, other=0.0)
    zero = tl.load(zero_ptr + rows, mask=pos_ok, other=0.0)
    return ((codes - zero[:, None]) * scale[:, None]).to(OUT_DTYPE).to(tl.float32)


@triton.jit
def _code_tile(codes_ptr, scale_ptr, zero_ptr, row0, pos, pos_ok, D: tl.constexpr):
    """Rows row0 + pos of a packed cache tensor as float32 codes [BLOCK_N, D] (not dequantized),
    with their scale and zero point [BLOCK_N]. The codes become floats by placing the 4-bit value
    in the mantissa of 2^23 and subtracting 2^23 (an OR and an add instead of a conversion)."""
    half = tl.arange(0, D // 2)
    rows = row0 + pos.to(tl.int64)
    packed = tl.load(codes_ptr + rows[:, None] * (D // 2) + half[None, :], mask=pos_ok[:, None], other=0)
    codes = unpack_nibbles(packed.to(tl.int32), pos.shape[0], D)
    codes = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return codes, tl.load(scale_ptr + rows, mask=pos_ok, other=0.0), tl.load(zero_ptr + rows, mask=pos_ok, other=0.0)


@triton.jit
def _mma(lhs, rhs):
    """lhs · rhs on the tensor cores, float32 out (a float32 pair multiplies in IEEE float32, not
    TF32; the interpreter, whose bf16 products are wrong, gets the same rounded values in float32)."""
    if _INTERPRET:
        lhs, rhs = lhs.to(tl.float32), rhs.to(tl.float32)
    if lhs.dtype == tl.float32:
        return tl.dot(lhs, rhs, input_precision="ieee")
    return tl.dot(lhs, rhs)


@triton.jit
def _row0_product(row, tile, TRANS: tl.constexpr):
    """row · tile (TRANS: row · tileᵀ) on the tensor cores (`_mma`): the row is padded to the
    MMA's 16 rows (15 of them zero), rounded to the tile's dtype, and row 0 of the float32
    product is returned."""
    first = tl.arange(0, 16)[:, None] == 0
    lhs = tl.where(first, row[None, :], 0.0).to(tile.dtype)
    prod = _mma(lhs, tl.trans(tile) if TRANS else tile)
    return tl.sum(tl.where(first, prod, 0.0), axis=0)


@triton.jit
def _attend_tile(q, q_sum, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, mask_stride, mask_row, row0, pos, pos_ok,
                 m, s_exp, acc, scaling, D: tl.constexpr, HAS_MASK: tl.constexpr, OUT_DTYPE: tl.constexpr,
                 FOLD: tl.constexpr, DOT: tl.constexpr):
    """One tile of positions into the running (max, sum of exponentials, unnormalised output).
    FOLD: the per-row scale s and zero z stay out of the per-element work, q·((c − z)·s) =
    s·(q·c − z·Σq) and Σ p·(c − z)·s = Σ (p·s)·c − Σ p·s·z (no model-dtype rounding of K and V);
    else each element is dequantized and rounded to the model dtype first (session 10's kernel).
    DOT (with FOLD): q·codes and (p·s)·codes as tensor-core products (`_row0_product`; the codes
    are exact in any float dtype, q keeps its own dtype OUT_DTYPE, p·s is rounded to fp16 as SDPA
    rounds its probabilities) instead of CUDA-core multiply-adds and reductions."""
    if HAS_MASK:
        pos_ok = pos_ok & (tl.load(mask_row + pos.to(tl.int64) * mask_stride, mask=pos_ok, other=0) != 0)
    if FOLD:
        kc, ks, kz = _code_tile(kc_ptr, ks_ptr, kz_ptr, row0, pos, pos_ok, D)
        if DOT:
            qk = _row0_product(q, kc.to(OUT_DTYPE), True)
        else:
            qk = tl.sum(kc * q[None, :], axis=1)
        dots = ks * (qk - kz * q_sum)
    else:
        dots = tl.sum(_dequantized_tile(kc_ptr, ks_ptr, kz_ptr, row0, pos, pos_ok, D, OUT_DTYPE) * q[None, :], axis=1)
    scores = tl.where(pos_ok, dots * scaling, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no (−inf) − (−inf)
    p = tl.exp(scores - m_ref)
    decay = tl.exp(m - m_ref)
    if FOLD:
        vc, vs, vz = _code_tile(vc_ptr, vs_ptr, vz_ptr, row0, pos, pos_ok, D)
        ps = p * vs
        if DOT:
            ps = ps.to(tl.float16).to(tl.float32)  # the product's operand, also in the zero-point term
            pv = _row0_product(ps, vc.to(tl.float16), False) - tl.sum(ps * vz, axis=0)
        else:
            pv = tl.sum(ps[:, None] * vc, axis=0) - tl.sum(ps * vz, axis=0)
    else:
        pv = tl.sum(p[:, None] * _dequantized_tile(vc_ptr, vs_ptr, vz_ptr, row0, pos, pos_ok, D, OUT_DTYPE), axis=0)
    return m_new, s_exp * decay + tl.sum(p, axis=0), acc * decay + pv


@triton.jit
def decode_attention_split_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, mask_ptr,
                                  m_ptr, l_ptr, acc_ptr, HQ, GROUP, HKV, L, CHUNK, TILES, SPLITS,
                                  sqb, sqh, smb, sml, scaling,
                                  D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                                  OUT_DTYPE: tl.constexpr, FOLD: tl.constexpr = True, STAGES: tl.constexpr = 1,
                                  DOT: tl.constexpr = True):
    bh = tl.program_id(0)  # b · HQ + h
    split = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + d).to(tl.float32)
    q_sum = tl.sum(q, axis=0)
    row0 = (b.to(tl.int64) * HKV + h // GROUP) * L
    mask_row = mask_ptr + b.to(tl.int64) * smb
    m = tl.full([1], float("-inf"), tl.float32)
    s_exp = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    start = split * CHUNK  # TILES = CHUNK / BLOCK_N tiles; those past L are fully masked (last split)
    if _INTERPRET:  # Triton 3.6's interpreter cannot run `range` over a runtime bound
        tile = 0
        while tile < TILES:
            pos = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            m, s_exp, acc = _attend_tile(q, q_sum, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, sml, mask_row,
                                         row0, pos, pos < L, m, s_exp, acc, scaling, D, HAS_MASK, OUT_DTYPE, FOLD, DOT)
            tile += 1
    else:
        for tile in tl.range(TILES, num_stages=STAGES):  # STAGES > 1: the next tiles' loads in flight
            pos = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            m, s_exp, acc = _attend_tile(q, q_sum, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, sml, mask_row,
                                         row0, pos, pos < L, m, s_exp, acc, scaling, D, HAS_MASK, OUT_DTYPE, FOLD, DOT)
    part = bh.to(tl.int64) * SPLITS + split
    tl.store(m_ptr + part + tl.arange(0, 1), m)
    tl.store(l_ptr + part + tl.arange(0, 1), s_exp)
    tl.store(acc_ptr + part * D + d, acc)


@triton.jit
def decode_attention_group_kernel(q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, mask_ptr,
                                  m_ptr, l_ptr, acc_ptr, HQ, GROUP, HKV, L, CHUNK, TILES, SPLITS,
                                  sqb, sqh, smb, sml, scaling,
                                  D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                                  OUT_DTYPE: tl.constexpr, GP: tl.constexpr):
    """The split kernel's FOLD + DOT arithmetic with one program per (sequence, KV head, split)
    for the GROUP query heads that read that KV head: they are the rows of the tensor-core
    products (GP ≥ 16 rows, the padding rows zero), so each K and V tile is read and unpacked once
    for the group instead of once per query head."""
    bk = tl.program_id(0)  # b · HKV + kv
    split = tl.program_id(1)
    b = bk // HKV
    kv = bk % HKV
    g = tl.arange(0, GP)
    g_ok = g < GROUP
    h = kv * GROUP + g  # the group's query heads
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h[:, None] * sqh + d[None, :], mask=g_ok[:, None], other=0.0)
    q_sum = tl.sum(q.to(tl.float32), axis=1)
    q = q.to(OUT_DTYPE)
    row0 = bk.to(tl.int64) * L
    mask_row = mask_ptr + b.to(tl.int64) * smb
    m = tl.full([GP], float("-inf"), tl.float32)
    s_exp = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    start = split * CHUNK
    tile = 0
    while tile < TILES:  # (a while loop: the interpreter cannot run `range` over a runtime bound)
        pos = start + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        pos_ok = pos < L
        if HAS_MASK:
            pos_ok = pos_ok & (tl.load(mask_row + pos.to(tl.int64) * sml, mask=pos_ok, other=0) != 0)
        kc, ks, kz = _code_tile(kc_ptr, ks_ptr, kz_ptr, row0, pos, pos_ok, D)
        qk = _mma(q, tl.trans(kc.to(OUT_DTYPE)))  # [GP, BLOCK_N]
        scores = tl.where(pos_ok[None, :], ks[None, :] * (qk - kz[None, :] * q_sum[:, None]) * scaling,
                          float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no (−inf) − (−inf)
        p = tl.exp(scores - m_ref[:, None])
        decay = tl.exp(m - m_ref)
        vc, vs, vz = _code_tile(vc_ptr, vs_ptr, vz_ptr, row0, pos, pos_ok, D)
        ps = (p * vs[None, :]).to(tl.float16)  # the product's operand, also in the zero-point term
        pv = _mma(ps, vc.to(tl.float16)) - tl.sum(ps.to(tl.float32) * vz[None, :], axis=1)[:, None]
        s_exp = s_exp * decay + tl.sum(p, axis=1)
        acc = acc * decay[:, None] + pv
        m = m_new
        tile += 1
    part = (b.to(tl.int64) * HQ + h) * SPLITS + split
    tl.store(m_ptr + part, m, mask=g_ok)
    tl.store(l_ptr + part, s_exp, mask=g_ok)
    tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=g_ok[:, None])


@triton.jit
def decode_attention_merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, HQ, SPLITS, sob, soh,
                                  D: tl.constexpr, BLOCK_S: tl.constexpr):
    bh = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    ok = s < SPLITS
    base = bh.to(tl.int64) * SPLITS
    m = tl.load(m_ptr + base + s, mask=ok, other=float("-inf"))
    m_all = tl.max(m, axis=0)
    m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(ok, tl.exp(m - m_ref), 0.0)
    total = tl.sum(w * tl.load(l_ptr + base + s, mask=ok, other=0.0), axis=0)
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + (base + s)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / total  # a fully masked row gives NaN, as SDPA does
    b = bh // HQ
    h = bh % HQ
    tl.store(out_ptr + b.to(tl.int64) * sob + h * soh + d, out.to(out_ptr.dtype.element_ty))


def supported(head_dim: int, bits: int, group_size: int) -> bool:
    """Packed (≤ 4-bit) per-row codes, a power-of-two head_dim from 16 to 256."""
    return bits <= 4 and group_size == 0 and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
_WORKSPACE: dict[tuple, tuple[torch.Tensor, ...]] = {}


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _splits(programs: int, length: int, device: torch.device) -> int:
    """Enough splits for ~4 programs per SM, each at least one tile long."""
    return max(1, min(triton.cdiv(4 * _sm_count(device), programs), triton.cdiv(length, BLOCK_N)))


def group_kernel_applies(dtype: torch.dtype, hq: int, hkv: int) -> bool:
    """Whether `decode_attention` gives a KV head's query heads one program (grouped-query
    attention, Hq > Hkv). MHA keeps the per-query-head kernel (5–7% faster at batch ≥ 16 on the
    H100), and so does a float32 query: the group kernel's float32 products spill on sm_90
    (`scripts/kernel_resources.py --only attention`: D = 128 32 registers and 3 KB of stack, D = 64
    255 and 264 B; the per-query-head kernel 88–110 registers, no spill)."""
    return hq > hkv and dtype != torch.float32


def decode_attention(query: torch.Tensor, key_parts: tuple[torch.Tensor, ...], value_parts: tuple[torch.Tensor, ...],
                     mask: torch.Tensor | None, scaling: float, fold: bool = True, stages: int = 1,
                     warps: int = 4, dot: bool = True, grouped: bool | None = None) -> torch.Tensor:
    """softmax(q·Kᵀ·scaling, masked)·V for query [B, Hq, 1, D] over a StaticQuantizedKVCache layer's
    (packed codes [B, Hkv, L, D/2], scale, zero [B, Hkv, L, 1]) for K and V; mask bool
    [B or 1, 1, 1, L] (True: attend) or None (all positions). Returns [B, 1, Hq, D] (the layout
    transformers' attention functions return), in query's dtype. grouped (with fold and dot, for
    grouped-query attention; None: where `group_kernel_applies`): one program per KV head for its
    query heads
    (`decode_attention_group_kernel`); else one per query head, with the split kernel's FOLD,
    STAGES, num_warps and DOT from fold, stages, warps, dot (defaults from
    `scripts/decode_attention_speed.py`)."""
    b, hq, _, d = query.shape
    hkv, length = key_parts[0].shape[1], key_parts[0].shape[2]
    if grouped is None:
        grouped = group_kernel_applies(query.dtype, hq, hkv)
    grouped = grouped and fold and dot and hq > hkv
    splits = _splits(b * (hkv if grouped else hq), length, query.device)
    key = (b * hq, splits, d, query.device)
    if key not in _WORKSPACE:  # reused: repeated calls and CUDA graphs allocate nothing
        _WORKSPACE[key] = (torch.empty(b * hq * splits, device=query.device),
                           torch.empty(b * hq * splits, device=query.device),
                           torch.empty(b * hq * splits * d, device=query.device))
    m, s_exp, acc = _WORKSPACE[key]
    chunk = triton.cdiv(triton.cdiv(length, splits), BLOCK_N) * BLOCK_N  # positions per split
    out = torch.empty(b, 1, hq, d, dtype=query.dtype, device=query.device)
    if mask is not None:
        smb, sml = (mask.stride(0) if mask.shape[0] > 1 else 0), mask.stride(3)
    else:
        smb = sml = 0
    args = (query, *key_parts, *value_parts, query if mask is None else mask, m, s_exp, acc, hq, hq // hkv, hkv,
            length, chunk, chunk // BLOCK_N, splits, query.stride(0), query.stride(1), smb, sml, float(scaling))
    meta = dict(D=d, BLOCK_N=BLOCK_N, HAS_MASK=mask is not None, OUT_DTYPE=_TL_DTYPES[query.dtype], num_warps=warps)
    if grouped:
        decode_attention_group_kernel[(b * hkv, splits)](*args, GP=max(16, triton.next_power_of_2(hq // hkv)),
                                                         **meta)
    else:
        decode_attention_split_kernel[(b * hq, splits)](*args, FOLD=fold, STAGES=stages, DOT=dot and fold, **meta)
    decode_attention_merge_kernel[(b * hq,)](m, s_exp, acc, out, hq, splits, out.stride(0), out.stride(2), D=d,
                                             BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out
