"""Decode GEMM (few tokens): int8 activations × packed 4-bit weights, read straight from
the packed bytes. Two kernels:

* `w4a8_gemv` (M ≤ 16; the decode default up to ops.DECODE_GEMV_MAX_M = 4): CUDA-core
  GEMV. Each packed int32 word (8 codes) becomes two int8x4 operands with two logic ops
  and feeds `dp4a` (4 multiply-adds per instruction) for every token; split-K partial
  sums are scaled and added with fp32 atomics, and the last program of each row block
  writes the output. One launch, no padding of the tokens to an MMA tile.
* `w4a8_decode` (M ≤ 64; the decode default above ops.DECODE_GEMV_MAX_M): at M ≤ 64 a
  linear layer is bound by reading the weight, so the kernel is built around that stream:
  each program reads a [BLOCK_N, BLOCK_K/2] tile of packed bytes with 16-byte loads along
  K, splits the nibbles four bytes per instruction, and feeds two int8 MMAs (low nibbles
  with the even activation columns, high nibbles with the odd ones, so no interleave is
  needed). The tokens are the small MMA dimension (padded to 16). Split-K gives every SM
  several programs even for N = 576, and joins up to three weights in one launch
  (`w4a8_decode_joined`), as the GEMV does. Session 14 (sm_90 SASS of the K loop, default
  tile at M = 16): 6.95 → 3.69 instructions per packed byte with the nibbles split four
  bytes at a time, and the separate split-K reduce kernel is gone.

Zero point (both): Σ_k a·(q − z) = Σ_k a·q − z·Σ_k a, exact in int32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from duquant.kernels.dependent_launch import pdl_supported


_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 for the 128-byte line at each of `ptrs`: no registers held, nothing waited for."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _nibbles(p):
    """Packed bytes (uint8) -> their low and high nibbles as int8, four bytes per instruction (one
    32-bit register holds four of them: `and` with 0x0F0F0F0F, and a shift first for the high ones).
    Byte by byte the compiler extracts and re-packs every byte (~6 byte permutes per packed byte)."""
    if _INTERPRET:
        lo = (p & 0xF).to(tl.int8)
        hi = (p >> 4).to(tl.int8)
    else:
        lo = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [p], dtype=tl.int8, is_pure=True,
                                       pack=4)
        hi = tl.inline_asm_elementwise("{ .reg .b32 t; shr.b32 t, $1, 4; and.b32 $0, t, 0x0F0F0F0F; }", "=r,r",
                                       [p], dtype=tl.int8, is_pure=True, pack=4)
    return lo, hi


@triton.jit
def _decode_step(w_tile, a_tile, k0, K, rh, rk, acc, a_sum, BLOCK_M: tl.constexpr, HALF: tl.constexpr,
                 A_FP8: tl.constexpr, EVEN_K: tl.constexpr):
    """One K tile of `w4a8_decode_kernel`: acc += a_even·lo(w)ᵀ + a_odd·hi(w)ᵀ on the int8 tensor cores."""
    if EVEN_K:
        p = tl.load(w_tile + k0 // 2)
        a = tl.load(a_tile + k0)
    else:
        p = tl.load(w_tile + k0 // 2, mask=((k0 + 2 * rh) < K)[None, :], other=0)
        a = tl.load(a_tile + k0, mask=((k0 + rk) < K)[None, :], other=0.0)
    if A_FP8:
        a = a.to(tl.float32).to(tl.int8)
    ae, ao = tl.split(tl.reshape(a, [BLOCK_M, HALF, 2]))
    lo, hi = _nibbles(p)
    acc = tl.dot(ae, tl.trans(lo), acc, out_dtype=tl.int32)
    acc = tl.dot(ao, tl.trans(hi), acc, out_dtype=tl.int32)
    a_sum += tl.sum(a.to(tl.int32), axis=1)
    return acc, a_sum


@triton.jit(do_not_specialize=["split_k", "tiles_per_split", "N", "N1", "N2", "T1", "T2"])
def w4a8_decode_kernel(
    a_ptr, w_ptr, w2_ptr, w3_ptr, sx_ptr, sw_ptr, zw_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, N1, N2, T1, T2, K, stride_am, stride_wn, stride_om, split_k, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    HAS_BIAS: tl.constexpr, A_FP8: tl.constexpr, EVEN_K: tl.constexpr, SEGMENTS: tl.constexpr,
):
    """Program (pid_n, pid_k): BLOCK_N weight rows × `tiles_per_split` tiles of BLOCK_K along K.

    The packed weight tile is [BLOCK_N, BLOCK_K/2] bytes, contiguous along K (16-byte loads, cp.async
    pipelined NUM_STAGES deep); its low and high nibbles (`_nibbles`, four bytes per instruction)
    meet the even and odd activation columns in two int8 MMAs, so no interleave is needed. The
    tokens are the MMA's M dimension (padded to 16 rows). Split-K partial sums, the segments of
    joined weights (q/k/v, gate/up: SEGMENTS > 1) and the output go as in the GEMV (`_segment`,
    `_write_output`): one launch, no reduce kernel."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    w_base, row0, col0, rows_here = _segment(pid_n, w_ptr, w2_ptr, w3_ptr, N, N1, N2, T1, T2, BLOCK_N, SEGMENTS)
    rm = tl.arange(0, BLOCK_M)
    r_local = row0 + tl.arange(0, BLOCK_N)
    rn = col0 + r_local  # output column
    rh = tl.arange(0, HALF)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = r_local < rows_here
    # clamp rows and tokens instead of masking them (unmasked 16-byte loads): never stored
    rm_safe = tl.where(m_ok, rm, 0)
    rn_safe = tl.where(n_ok, r_local, 0)
    w_tile = w_base + rn_safe[:, None].to(tl.int64) * stride_wn + rh[None, :]  # [BLOCK_N, HALF]
    a_tile = a_ptr + rm_safe[:, None] * stride_am + rk[None, :]  # [BLOCK_M, BLOCK_K]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    a_sum = tl.zeros([BLOCK_M], dtype=tl.int32)
    t_lo = pid_k * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(K, BLOCK_K))
    if _INTERPRET:  # Triton 3.6's interpreter cannot run `range` over a runtime bound
        t = t_lo
        while t < t_hi:
            acc, a_sum = _decode_step(w_tile, a_tile, t * BLOCK_K, K, rh, rk, acc, a_sum, BLOCK_M, HALF, A_FP8, EVEN_K)
            t += 1
    else:
        for t in tl.range(t_lo, t_hi, num_stages=NUM_STAGES):
            acc, a_sum = _decode_step(w_tile, a_tile, t * BLOCK_K, K, rh, rk, acc, a_sum, BLOCK_M, HALF, A_FP8, EVEN_K)
    zw = tl.load(zw_ptr + rn, mask=n_ok, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
    val = acc.to(tl.float32) - a_sum.to(tl.float32)[:, None] * zw[None, :]  # exact integers
    _write_output(val * sx[:, None] * sw[None, :], rm, rn, m_ok, n_ok, pid_n, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                  N, stride_om, split_k, HAS_BIAS, BLOCK_M, BLOCK_N)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_config(m: int, n: int, k: int, num_sms: int, block_n: int = 64, block_k: int = 256,
                  waves: int = 4, num_warps: int = 4, num_stages: int = 4) -> dict[str, int]:
    """Tiles and split-K for `w4a8_decode`: ≥ `waves` programs per SM where K allows it, each
    split a whole number of tiles. BLOCK_K is halved until it divides K where it can: a masked
    last tile masks every tile's loads, which then go byte by byte (K = 11008 with 512: 54 µs
    against 17 with 256). Defaults: the H100 sweep of session 14 (results/bench_h100/session14/
    kernel_decode_mma.md), where 64 × 256 on 4 warps, 4 stages was within 0-7% of the best tile
    at M = 8 and 16 on the three 7B shapes (4096²: 9.7-10.0 µs, 11008×4096: 18.7, 4096×11008: 17.3)."""
    while block_k > 64 and k % block_k:
        block_k //= 2
    block_k = max(64, min(block_k, triton.next_power_of_2(k)))
    return {"BLOCK_M": max(16, triton.next_power_of_2(m)), "BLOCK_N": block_n, "BLOCK_K": block_k,
            "NUM_STAGES": num_stages, "num_warps": num_warps, **_split_k(n, k, block_n, block_k, waves, num_sms)}


def _split_k(n: int, k: int, block_n: int, block_k: int, waves: int, num_sms: int) -> dict[str, int]:
    """Splits of K so that ≥ `waves` programs per SM run where K allows it, each split a whole
    number of tiles (no empty splits): {"split_k", "tiles_per_split"} (runtime kernel arguments)."""
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = max(1, min(k_tiles, triton.cdiv(waves * num_sms, n_tiles)))
    tiles_per_split = triton.cdiv(k_tiles, split)
    return {"split_k": triton.cdiv(k_tiles, tiles_per_split), "tiles_per_split": tiles_per_split}


def _stacked(rows: list[int], block_n: int) -> tuple[int, int, int, int, int]:
    """Up to three weights of `rows` rows stacked into one output, in row blocks of block_n that
    never straddle two weights: (row blocks in all, N1, N2, T1, T2), `_segment`'s arguments."""
    tiles = [triton.cdiv(r, block_n) for r in rows]
    n1, n2 = rows[0], rows[1] if len(rows) > 1 else 0
    t1, t2 = tiles[0], tiles[0] + (tiles[1] if len(tiles) > 1 else 0)
    return sum(tiles), n1, n2, t1, t2


def _one_layout(packed: list[torch.Tensor]) -> bool:
    """1–3 packed weights with equal K and row stride (what a joined launch reads)."""
    return 1 <= len(packed) <= 3 and all(
        p.shape[1] == packed[0].shape[1] and p.stride(0) == packed[0].stride(0) for p in packed)


DECODE_MAX_M = 64  # largest token count `w4a8_decode` takes


def joined_decode_supported(m: int, k: int, packed: list[torch.Tensor]) -> bool:
    """`w4a8_decode_joined` takes 1–3 packed weights of one layout with contiguous rows."""
    return 1 <= m <= DECODE_MAX_M and _one_layout(packed) and all(p.stride(-1) == 1 and p.shape[1] * 2 >= k
                                                                  for p in packed)


def w4a8_decode(a: torch.Tensor, s_x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor,
                w_zero: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                config: dict[str, int] | None = None, **tune: int) -> torch.Tensor:
    """a int8/e4m3 [M, K] (M ≤ 64), packed uint8 [N, K/2] -> y [M, N] out_dtype.
    tune: block_n, block_k, waves, num_warps, num_stages (see `decode_config`)."""
    return w4a8_decode_joined(a, s_x, [packed], w_scale, w_zero, bias, out_dtype, config, **tune)


def w4a8_decode_joined(a: torch.Tensor, s_x: torch.Tensor, packed: list[torch.Tensor], w_scale: torch.Tensor,
                       w_zero: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                       config: dict[str, int] | None = None, **tune: int) -> torch.Tensor:
    """`w4a8_decode` of one activation by up to three weights (q/k/v, gate/up) in one launch:
    y [M, ΣN_i], as `w4a8_gemv_joined` (scale, zero point and bias over the stacked rows)."""
    m, k = a.shape
    if not joined_decode_supported(m, k, packed):
        raise ValueError(f"the decode kernel joins 1 to 3 weights of one layout and takes at most {DECODE_MAX_M} "
                         f"tokens (M={m}, K={k}, weights {[tuple(q.shape) for q in packed]})")
    if a.stride(-1) != 1:
        a = a.contiguous()
    rows = [p.shape[0] for p in packed]
    n = sum(rows)
    cfg = dict(config or decode_config(m, n, k, _num_sms(a.device), **tune))
    split_k, tiles_per_split = cfg.pop("split_k"), cfg.pop("tiles_per_split")  # runtime: no recompiles
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    n_tiles, n1, n2, t1, t2 = _stacked(rows, cfg["BLOCK_N"])
    ws, cnt = _split_workspace(m, n, n_tiles, split_k, a.device)
    has_bias = bias is not None
    w4a8_decode_kernel[(n_tiles, split_k)](
        a, *packed, *[packed[0]] * (3 - len(packed)), s_x, w_scale, w_zero, bias if has_bias else out, out, ws, cnt,
        m, n, n1, n2, t1, t2, k, a.stride(0), packed[0].stride(0), out.stride(0), split_k, tiles_per_split,
        HAS_BIAS=has_bias, A_FP8=a.dtype == torch.float8_e4m3fn, EVEN_K=k % cfg["BLOCK_K"] == 0,
        SEGMENTS=len(packed), **cfg,
    )
    return out


# --- GEMV path (M ≤ 16): CUDA-core dp4a, one launch ------------------------------------

GEMV_MAX_M = 16  # largest token count the GEMV kernel takes (tokens are a register dimension)


@triton.jit
def _dp4a(a, b, c):
    """c + Σ_{i<4} a.byte[i] · b.byte[i], bytes read as signed int8 (weight nibbles are 0..15)."""
    if _INTERPRET:  # no inline PTX in the interpreter: the same arithmetic with shifts
        r = c
        for i in tl.static_range(4):
            r += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
    else:
        r = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    return r


@triton.jit
def _even_odd(x0, x1):
    """Activation words x0 = bytes (a0 a1 a2 a3), x1 = (a4 a5 a6 a7) -> (a0 a2 a4 a6), (a1 a3 a5 a7),
    the byte order of `w & 0x0F0F0F0F` and `(w >> 4) & 0x0F0F0F0F` for a packed word w."""
    if _INTERPRET:
        u0 = x0.to(tl.uint32, bitcast=True)
        u1 = x1.to(tl.uint32, bitcast=True)
        ue = (u0 & 0xFF) | ((u0 >> 8) & 0xFF00) | ((u1 << 16) & 0xFF0000) | ((u1 << 8) & 0xFF000000)
        uo = ((u0 >> 8) & 0xFF) | ((u0 >> 16) & 0xFF00) | ((u1 << 8) & 0xFF0000) | (u1 & 0xFF000000)
        ae = ue.to(tl.int32, bitcast=True)
        ao = uo.to(tl.int32, bitcast=True)
    else:  # one byte permute each (prmt selects bytes of the 8-byte pair {x1, x0})
        ae = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x6420;", "=r,r,r", [x0, x1], dtype=tl.int32,
                                       is_pure=True, pack=1)
        ao = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7531;", "=r,r,r", [x0, x1], dtype=tl.int32,
                                       is_pure=True, pack=1)
    return ae, ao


@triton.jit
def _split4(x):
    """[D0, D1, 4] -> four [D0, D1]: the 4 words of one 16-byte load, all held by one thread."""
    x01, x23 = tl.split(tl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))
    x0, x1 = tl.split(x01)
    x2, x3 = tl.split(x23)
    return x0, x1, x2, x3


@triton.jit
def _weight_words(w_ptrs, kw, kw_total, rw, EVEN_K: tl.constexpr):
    """The packed weight words of one K tile ([BLOCK_N, WT] int32)."""
    if EVEN_K:
        return tl.load(w_ptrs + kw)
    return tl.load(w_ptrs + kw, mask=((kw + rw) < kw_total)[None, :], other=0)


@triton.jit
def _activation_words(a_ptrs, kw, kw_total, ra, EVEN_K: tl.constexpr, CACHE: tl.constexpr = ""):
    """The activation words of one K tile ([BLOCK_M, 2·WT] int32). CACHE ".cg": from L2, past
    this SM's L1 (codes another program of the same launch wrote)."""
    if EVEN_K:
        return tl.load(a_ptrs + 2 * kw, cache_modifier=CACHE)
    return tl.load(a_ptrs + 2 * kw, mask=((2 * kw + ra) < 2 * kw_total)[None, :], other=0, cache_modifier=CACHE)


@triton.jit
def _gemv_words(w, av, acc, asum, ones, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, G: tl.constexpr):
    """One K tile's words: acc[t, n, g] += Σ over the 4 words of group g of dp4a(codes, activations)."""
    # activation words 2j, 2j+1 belong to weight word j (k = 8j .. 8j+7)
    x0, x1 = tl.split(tl.reshape(av, [BLOCK_M, G, 4, 2]))
    asum = _dp4a(x0, ones, _dp4a(x1, ones, asum))  # Σ a, for the zero point
    ae, ao = _even_odd(x0, x1)
    w = tl.reshape(w, [BLOCK_N, G, 4])
    lo = w & 0x0F0F0F0F  # codes of k = 8j, 8j+2, 8j+4, 8j+6 as int8x4
    hi = (w >> 4) & 0x0F0F0F0F  # k = 8j+1, +3, +5, +7
    l0, l1, l2, l3 = _split4(lo)
    h0, h1, h2, h3 = _split4(hi)
    e0, e1, e2, e3 = _split4(ae)
    o0, o1, o2, o3 = _split4(ao)
    # [1, BLOCK_N, G] × [BLOCK_M, 1, G]: each thread chains its 4 words into one accumulator
    acc = _dp4a(l0[None, :, :], e0[:, None, :], acc)
    acc = _dp4a(h0[None, :, :], o0[:, None, :], acc)
    acc = _dp4a(l1[None, :, :], e1[:, None, :], acc)
    acc = _dp4a(h1[None, :, :], o1[:, None, :], acc)
    acc = _dp4a(l2[None, :, :], e2[:, None, :], acc)
    acc = _dp4a(h2[None, :, :], o2[:, None, :], acc)
    acc = _dp4a(l3[None, :, :], e3[:, None, :], acc)
    acc = _dp4a(h3[None, :, :], o3[:, None, :], acc)
    return acc, asum


@triton.jit
def _gemv_tile(w_ptrs, a_ptrs, kw, kw_total, rw, ra, acc, asum, ones,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, G: tl.constexpr, EVEN_K: tl.constexpr,
               CACHE: tl.constexpr = ""):
    """One K tile, loads and products."""
    w = _weight_words(w_ptrs, kw, kw_total, rw, EVEN_K)
    av = _activation_words(a_ptrs, kw, kw_total, ra, EVEN_K, CACHE)
    return _gemv_words(w, av, acc, asum, ones, BLOCK_N, BLOCK_M, G)


@triton.jit
def _load_acquire(ptr):
    """The int32 at ptr, read with acquire semantics at GPU scope (every later load of this
    thread sees what the writer released before it)."""
    if _INTERPRET:
        v = tl.atomic_add(ptr, 0, sem="acquire")
    else:
        v = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                      is_pure=False, pack=1)
    return v


@triton.jit
def _nanosleep(ns):
    """Suspend the thread for about ns nanoseconds (an int32 value)."""
    if not _INTERPRET:
        tl.inline_asm_elementwise("nanosleep.u32 $1; // dummy $0", "=r,r", [ns], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def wait_for_count(ptr, target, BACKOFF_NS: tl.constexpr = 0):
    """Spin until the counter at ptr reaches target (every thread polls: each one then holds
    its own acquire). BACKOFF_NS > 0: sleep that long between polls (fewer requests to the
    flag's L2 line while the programs that will set it still work)."""
    v = _load_acquire(ptr)
    while v < target:
        if BACKOFF_NS > 0:
            _nanosleep(v * 0 + BACKOFF_NS)
        v = _load_acquire(ptr)


# How a GEMV program learns that its activations are ready.
READY_AT_LAUNCH = tl.constexpr(0)  # written by an earlier kernel (stream order)
READY_AFTER_PDL_WAIT = tl.constexpr(1)  # an earlier kernel, launched with PDL (`griddepcontrol.wait`)
READY_AT_COUNT = tl.constexpr(2)  # written by programs of this launch, which count up a flag


# split_k / tiles_per_split stay runtime values (no "== 1" specialization): a one-split call
# and a split-K call share one binary, so a warm-up call compiles what a graph capture needs.
# N1, N2, T1, T2 too: a value of 1 would become a compile-time constant, whose type differs from
# the runtime ints the segment branches below assign to the same variables.
@triton.jit(do_not_specialize=["split_k", "tiles_per_split", "N", "N1", "N2", "T1", "T2"])
def w4a8_gemv_kernel(
    a_ptr, w_ptr, w2_ptr, w3_ptr, sx_ptr, sw_ptr, zw_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, N1, N2, T1, T2, KW, stride_a, stride_w, stride_om, split_k, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, SEGMENTS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Bandwidth-first GEMV over packed W4: y[t, n] = s_x[t]·s_w[n]·Σ_k a[t, k]·(q[n, k] − z[n]) (+ bias).

    Operands as int32 words: a_ptr is the int8 activation [M, K] viewed as [M, K/4], w_ptr
    the packed weight [N, K/2] viewed as [N, KW = K/8] (8 codes per word, the stored
    layout, untouched). Program (pid_n, pid_k) owns BLOCK_N rows and `tiles_per_split`
    tiles of BLOCK_K along K.

    Per tile, every thread loads 16 contiguous bytes (4 words = 32 codes) of each of its rows
    (cp.async through shared memory when NUM_STAGES > 1, so the next tiles are in flight
    while this one is computed) and 32 activation bytes per token. Per word: `w & 0x0F0F0F0F`
    and `(w >> 4) & 0x0F0F0F0F` give the even and odd codes as int8x4; the activations get
    the same byte order once per tile (`prmt`), and each (word, token) pair costs 2 `dp4a`.
    Cost (sm_90 SASS of the loop, default tiles): 1.8 / 2.5 / 3.7 / 6.9 / 12.3 instructions
    per packed byte at M = 1 / 2 / 4 / 8 / 16, of which M/2 are dp4a. HBM at 3 TB/s feeds
    ~13 bytes per clock per SM and an SM issues 128 thread-instructions per clock, so the
    weight stream, not the ALU, bounds M ≤ 4 (≤ 40% issue) and about M = 8; M = 16 is
    issue/dp4a-bound near half the bandwidth (still no padding of the tokens to 16 rows).

    Split-K without a second launch: every program scales its partial sum (the epilogue is
    linear in it) and adds it to an fp32 workspace with atomics, then bumps the row block's
    arrival counter; the last to arrive reads the sums back while zeroing them (atomic
    exchange), adds the bias (so the bias is added exactly once), writes y and resets the
    counter. Workspace and counters are zero on entry and on exit: no memset per call, and
    the kernel is CUDA-graph capturable.

    Expected on H100 (graph replays, cold L2): ~2–2.8 TB/s of packed weight at M ≤ 4, i.e.
    3.5–5 µs at 4096×4096 (8.4 MB; BF16 cuBLAS 15.9 µs) and 8.5–11 µs at 11008×4096.

    SEGMENTS > 1 (`w4a8_gemv_joined`): the weight is up to three separate tensors (q/k/v or
    gate/up, which read one activation) whose rows are stacked into one output of N columns:
    rows [0, N1) of w_ptr, [N1, N1 + N2) of w2_ptr, the rest of w3_ptr. Row blocks never
    straddle two tensors: the first T1 row blocks belong to w_ptr, the next T2 − T1 to w2_ptr.
    Scale, zero point and bias are per output column of the stacked N.

    PDL (launched with programmatic dependent launch, after a transform kernel that lets its
    dependents start early): the programs that find room start while the transform still
    runs, ask L2 for their whole weight slice (`prefetch.global.L2`, one per 128-byte line),
    and only then wait for the transform (`griddepcontrol.wait`) before reading the
    activations. The weight stream of a decode linear then overlaps the transform before it
    instead of following it. Everything the kernel reads from an earlier kernel (codes,
    scales, split-K workspace) is read after the wait; before it, only the weight.
    Off by default (`dependent_launch`): on the H100 it gained ≤ 1.7 µs per linear at M = 1
    and lost up to 1.3 µs at M = 4; prefetching each row's whole slice in one bulk request
    was slower still (the flood of prefetches delays the latency-bound transform's own loads).
    """
    gemv_program(tl.program_id(0), tl.program_id(1), a_ptr, w_ptr, w2_ptr, w3_ptr, sx_ptr, sw_ptr, zw_ptr, bias_ptr,
                 out_ptr, ws_ptr, cnt_ptr, M, N, N1, N2, T1, T2, KW, stride_a, stride_w, stride_om, split_k,
                 tiles_per_split, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, HAS_BIAS, EVEN_K, ALIGNED, SEGMENTS,
                 READY_AFTER_PDL_WAIT if PDL else READY_AT_LAUNCH, cnt_ptr, 0)


@triton.jit
def gemv_program(
    pid_n, pid_k, a_ptr, w_ptr, w2_ptr, w3_ptr, sx_ptr, sw_ptr, zw_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, N1, N2, T1, T2, KW, stride_a, stride_w, stride_om, split_k, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, SEGMENTS: tl.constexpr,
    READY: tl.constexpr, ready_ptr, ready_count, PRELOAD: tl.constexpr = True, BACKOFF_NS: tl.constexpr = 0,
):
    """Program (pid_n, pid_k) of `w4a8_gemv_kernel` (see there). READY: when the activations
    and their scales may be read (READY_AT_LAUNCH, READY_AFTER_PDL_WAIT, or READY_AT_COUNT:
    once the int32 at ready_ptr reaches ready_count, polled every BACKOFF_NS nanoseconds (0:
    back to back); with PRELOAD the program loads its first weight tile before it waits. The
    codes and scales other programs wrote are read through L2 (.cg), past this SM's L1)."""
    G: tl.constexpr = BLOCK_K // 32  # 16-byte groups per row in a tile
    WT: tl.constexpr = BLOCK_K // 8  # int32 words per row in a tile
    rm = tl.arange(0, BLOCK_M)
    rw = tl.arange(0, WT)
    ra = tl.arange(0, 2 * WT)
    w_base, row0, col0, rows_here = _segment(pid_n, w_ptr, w2_ptr, w3_ptr, N, N1, N2, T1, T2, BLOCK_N, SEGMENTS)
    r_local = row0 + tl.arange(0, BLOCK_N)
    rn = col0 + r_local  # output column
    m_ok = rm < M
    n_ok = r_local < rows_here
    # clamp rows and tokens instead of masking them: their results are never stored
    rm_safe = tl.where(m_ok, rm, 0)
    rn_safe = tl.where(n_ok, r_local, 0)
    if ALIGNED:  # strides come in 16-byte units: the ×4 tells the compiler rows are 16-byte aligned
        w_row = rn_safe * stride_w * 4
        a_row = rm_safe * stride_a * 4
        kw_total = (KW // 4) * 4  # = KW; keeps the K mask constant over each 16-byte vector
    else:
        w_row = rn_safe * stride_w
        a_row = rm_safe * stride_a
        kw_total = KW
    w_ptrs = w_base + w_row[:, None] + rw[None, :]  # [BLOCK_N, WT]: contiguous along K
    a_ptrs = a_ptr + a_row[:, None] + ra[None, :]  # [BLOCK_M, 2·WT]
    acc = tl.zeros([BLOCK_M, BLOCK_N, G], dtype=tl.int32)
    asum = tl.zeros([BLOCK_M, G, 4], dtype=tl.int32)
    ones = tl.full([BLOCK_M, G, 4], 0x01010101, tl.int32)
    t_lo = pid_k * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, tl.cdiv(KW, WT))
    CACHE: tl.constexpr = ".cg" if READY == READY_AT_COUNT else ""
    if READY == READY_AFTER_PDL_WAIT:
        LINE: tl.constexpr = 32 if WT >= 32 else WT  # int32 words per 128-byte line (or per tile row)
        lines = tl.arange(0, WT // LINE) * LINE
        for t in range(t_lo, t_hi):
            off = tl.minimum(t * WT + lines, KW - 1)  # the last row's tail must not run past the tensor
            _prefetch_l2(w_base + w_row[:, None] + off[None, :])
        gdc_wait()  # the transform (the kernel before) has finished: its codes and scales are visible
    if READY == READY_AT_COUNT:
        if PRELOAD:  # the first tile's weight is on its way while the codes are made
            w_first = _weight_words(w_ptrs, t_lo * WT, kw_total, rw, EVEN_K)
            wait_for_count(ready_ptr, ready_count, BACKOFF_NS)
            av_first = _activation_words(a_ptrs, t_lo * WT, kw_total, ra, EVEN_K, CACHE)
            acc, asum = _gemv_words(w_first, av_first, acc, asum, ones, BLOCK_N, BLOCK_M, G)
            t_lo += 1
        else:
            wait_for_count(ready_ptr, ready_count, BACKOFF_NS)
    if _INTERPRET:  # Triton 3.6's interpreter cannot run `range` over a runtime bound
        t = t_lo
        while t < t_hi:
            acc, asum = _gemv_tile(w_ptrs, a_ptrs, t * WT, kw_total, rw, ra, acc, asum, ones,
                                   BLOCK_N, BLOCK_M, G, EVEN_K, CACHE)
            t += 1
    else:
        for t in tl.range(t_lo, t_hi, num_stages=NUM_STAGES):  # explicit stages: no dot, no default pipelining
            acc, asum = _gemv_tile(w_ptrs, a_ptrs, t * WT, kw_total, rw, ra, acc, asum, ones,
                                   BLOCK_N, BLOCK_M, G, EVEN_K, CACHE)
    dot = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N], exact int32
    a_tot = tl.sum(tl.sum(asum, axis=2), axis=1)  # [BLOCK_M]
    zw = tl.load(zw_ptr + rn, mask=n_ok, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
    sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0, cache_modifier=CACHE)
    val = dot.to(tl.float32) - a_tot.to(tl.float32)[:, None] * zw[None, :]  # exact integers (< 2^24)
    _write_output(val * sx[:, None] * sw[None, :], rm, rn, m_ok, n_ok, pid_n, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
                  N, stride_om, split_k, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _segment(pid_n, w_ptr, w2_ptr, w3_ptr, N, N1, N2, T1, T2, BLOCK_N: tl.constexpr, SEGMENTS: tl.constexpr):
    """Row block pid_n of up to three stacked weights (rows [0, N1) of w_ptr, [N1, N1 + N2) of
    w2_ptr, the rest of w3_ptr; the first T1 row blocks are w_ptr's, the next T2 − T1 w2_ptr's):
    its weight tensor, its first row there, the stacked output column of that row, and the rows
    that tensor has."""
    w_base = w_ptr
    row0 = pid_n * BLOCK_N
    col0 = pid_n * 0  # a runtime int like the values the branches assign
    rows_here = N
    if SEGMENTS > 1:
        rows_here = N1
        if pid_n >= T1:
            w_base = w2_ptr
            row0 = (pid_n - T1) * BLOCK_N
            col0 = N1
            rows_here = N2
            if SEGMENTS > 2:
                if pid_n >= T2:
                    w_base = w3_ptr
                    row0 = (pid_n - T2) * BLOCK_N
                    col0 = N1 + N2
                    rows_here = N - N1 - N2
    return w_base, row0, col0, rows_here


@triton.jit
def _write_output(part, rm, rn, m_ok, n_ok, pid_n, bias_ptr, out_ptr, ws_ptr, cnt_ptr, N, stride_om, split_k,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[rm, rn] from this program's scaled partial sum `part` [BLOCK_M, BLOCK_N]. One split: part
    (+ bias) is the output. Split-K without a second launch: every program adds its part to the
    fp32 workspace with atomics and bumps its row block's arrival counter; the last to arrive
    reads the sums back while zeroing them (atomic exchange), adds the bias once, writes y and
    resets the counter. Workspace and counters are zero on entry and on exit."""
    mask_o = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if split_k == 1:
        if HAS_BIAS:
            part += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, part.to(out_ptr.dtype.element_ty), mask=mask_o)
    else:
        ws_ptrs = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.atomic_add(ws_ptrs, part, mask=mask_o, sem="relaxed")
        # all threads' adds are issued before the (release) arrival; the last arriver acquires
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == split_k - 1:
            # read the sums and zero them in one atomic (on the int32 bits: the interpreter has no fp32 xchg)
            bits = tl.atomic_xchg(ws_ptrs.to(tl.pointer_type(tl.int32)), tl.zeros([BLOCK_M, BLOCK_N], tl.int32),
                                  mask=mask_o, sem="relaxed")
            y = bits.to(tl.float32, bitcast=True)
            if HAS_BIAS:
                y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_o)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)  # ready for the next call


def gemv_warps(m: int) -> int:
    """The GEMV's default warps for m tokens (`gemv_config`)."""
    return 4 if m <= 4 else 8


def gemv_config(m: int, n: int, k: int, num_sms: int, block_n: int | None = None, block_k: int | None = None,
                waves: int = 4, num_warps: int | None = None, num_stages: int = 3) -> dict[str, int]:
    """Tiles and split-K for `w4a8_gemv`: ≥ `waves` programs per SM where K allows it, each
    split a whole number of tiles (no empty splits).

    Defaults (sm_90 SASS, no spills): M ≤ 4: 32 rows × 1024 k, 4 warps (72–128 registers,
    16 KB of packed weight per tile); M ≤ 8: the same tile on 8 warps (128 registers);
    M ≤ 16: 64 × 512 on 8 warps (185 registers; activation bytes read per tile stay at half
    the weight bytes). Per thread the int32 accumulators are M·BLOCK_N·BLOCK_K/(1024·warps)."""
    block_n = block_n or (32 if m <= 8 else 64)
    block_k = block_k or (1024 if m <= 8 else 512)
    num_warps = num_warps or gemv_warps(m)
    block_k = max(32, min(block_k, triton.next_power_of_2(k)))
    return {"BLOCK_M": max(1, triton.next_power_of_2(m)), "BLOCK_N": block_n, "BLOCK_K": block_k,
            "NUM_STAGES": num_stages, "num_warps": num_warps, **_split_k(n, k, block_n, block_k, waves, num_sms)}


# Split-K workspace of the GEMV and of the MMA decode kernel (`_write_output`): fp32 sums and
# per-row-block arrival counters, zeroed once and left zeroed by every call. One per device: calls must not overlap (one stream, as in
# decoding). Call once before CUDA-graph capture: a workspace first needed during capture
# is a fresh zeroed one for that call (a memset node in the graph), not kept.
_GEMV_WS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_workspace(m: int, n: int, row_blocks: int, split_k: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The workspace a launch of m tokens × n columns in `row_blocks` row blocks needs. One split
    never touches it, but the kernel is compiled for its pointer types (split_k is a runtime
    value), so it still gets float32 sums and int32 counters."""
    numel, counters = (m * n, row_blocks) if split_k > 1 else (1, 1)
    ws, cnt = _GEMV_WS.get(device, (None, None))
    if ws is None or ws.numel() < numel or cnt.numel() < counters:
        ws = torch.zeros(max(numel, 1 << 18), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(counters, 1 << 12), dtype=torch.int32, device=device)
        # memory allocated while capturing is zeroed only when the graph replays
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _GEMV_WS[device] = (ws, cnt)
    return ws, cnt


def gemv_supported(m: int, k: int, packed: torch.Tensor) -> bool:
    """The GEMV reads the packed weight as int32 words: K % 8 == 0 and 4-byte aligned rows."""
    return (m <= GEMV_MAX_M and k % 8 == 0 and packed.stride(-1) == 1 and packed.stride(0) % 4 == 0
            and packed.data_ptr() % 4 == 0)


def joined_gemv_supported(m: int, k: int, packed: list[torch.Tensor]) -> bool:
    """`w4a8_gemv_joined` takes 1–3 weights of one layout that each suit the GEMV."""
    return _one_layout(packed) and all(gemv_supported(m, k, p) for p in packed)


def w4a8_gemv(a: torch.Tensor, s_x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor,
              w_zero: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              config: dict[str, int] | None = None, pdl: bool = False, **tune: int) -> torch.Tensor:
    """a int8/e4m3 [M, K] (M ≤ 16, K % 8 == 0), packed uint8 [N, K/2] -> y [M, N] out_dtype.

    pdl: launch with programmatic dependent launch where the GPU has it (`dependent_launch`):
    the weight is fetched into L2 while the kernel before still runs (see the kernel).
    tune: block_n, block_k, waves, num_warps, num_stages (see `gemv_config`)."""
    return w4a8_gemv_joined(a, s_x, [packed], w_scale, w_zero, bias, out_dtype, config, pdl, **tune)


def w4a8_gemv_joined(a: torch.Tensor, s_x: torch.Tensor, packed: list[torch.Tensor], w_scale: torch.Tensor,
                     w_zero: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                     config: dict[str, int] | None = None, pdl: bool = False, **tune: int) -> torch.Tensor:
    """One launch for up to three weights that read the same activation (q/k/v, gate/up):
    y [M, ΣN_i] = a·[W_1; W_2; W_3]ᵀ with the packed weights left where they are.

    packed: 1–3 uint8 [N_i, K/2] with equal K and row stride; w_scale, w_zero (and bias)
    cover the stacked rows: [ΣN_i]. Column block i of y is what `w4a8_gemv` gives for W_i.
    pdl: as for `w4a8_gemv`."""
    launch = gemv_launch(a, s_x, packed, w_scale, w_zero, bias, out_dtype, config, **tune)
    meta = dict(launch.meta)
    if pdl and pdl_supported(a.device):
        meta.update(PDL=True, launch_pdl=True)
    w4a8_gemv_kernel[(launch.row_blocks, launch.split_k)](*launch.args, **meta)
    return launch.out


@dataclass
class GemvLaunch:
    """What a launch of `gemv_program` needs: runtime arguments and compile-time ones (in the
    kernel's order, the number of warps among the latter), its (row blocks × splits) grid,
    and the output it fills."""
    args: tuple
    meta: dict
    row_blocks: int
    split_k: int
    out: torch.Tensor


def gemv_launch(a: torch.Tensor, s_x: torch.Tensor, packed: list[torch.Tensor], w_scale: torch.Tensor,
                w_zero: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                config: dict[str, int] | None = None, **tune: int) -> GemvLaunch:
    """Arguments of `gemv_program` for `w4a8_gemv_joined` (checks the shapes)."""
    m, k = a.shape
    if not joined_gemv_supported(m, k, packed):
        raise ValueError(f"the GEMV joins 1 to 3 weights and takes M ≤ {GEMV_MAX_M}, K % 8 == 0, 4-byte aligned "
                         f"weight rows of one stride (M={m}, K={k}, weights {[tuple(q.shape) for q in packed]})")
    rows = [p.shape[0] for p in packed]
    n = sum(rows)
    if a.dtype != torch.int8:  # e4m3 holding integers (not the decode carrier): exact conversion
        a = a.to(torch.int8)
    if a.stride(-1) != 1 or a.stride(0) % 4 or a.data_ptr() % 4:
        a = torch.empty_like(a, memory_format=torch.contiguous_format).copy_(a)
    cfg = dict(config or gemv_config(m, n, k, _num_sms(a.device), **tune))
    split_k, tiles_per_split = cfg.pop("split_k"), cfg.pop("tiles_per_split")  # runtime: no recompiles
    a32 = a.view(torch.int32)
    w32 = [p.view(torch.int32) for p in packed]
    sa, sw = a32.stride(0), w32[0].stride(0)
    aligned = sa % 4 == 0 and sw % 4 == 0 and (k // 8) % 4 == 0
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    n_tiles, n1, n2, t1, t2 = _stacked(rows, cfg["BLOCK_N"])
    w32 += [w32[0]] * (3 - len(w32))
    ws, cnt = _split_workspace(m, n, n_tiles, split_k, a.device)
    has_bias = bias is not None
    args = (a32, *w32, s_x, w_scale, w_zero, bias if has_bias else out, out, ws, cnt,
            m, n, n1, n2, t1, t2, k // 8, sa // 4 if aligned else sa, sw // 4 if aligned else sw, out.stride(0),
            split_k, tiles_per_split)
    meta = dict(HAS_BIAS=has_bias, EVEN_K=(k // 8) % (cfg["BLOCK_K"] // 8) == 0, ALIGNED=aligned,
                SEGMENTS=len(packed), **cfg)
    return GemvLaunch(args, meta, n_tiles, split_k, out)
