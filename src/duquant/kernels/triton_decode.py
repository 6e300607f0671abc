"""Decode GEMM (few tokens): int8 activations × packed 4-bit weights, read straight from
the packed bytes.

At M ≤ 64 a linear layer is bound by reading the weight, so the kernel is built around
that stream: each program reads a [BLOCK_N, BLOCK_K/2] tile of packed bytes with 16-byte
loads along K, splits the nibbles in registers, and feeds two int8 MMAs (low nibbles with
the even activation columns, high nibbles with the odd ones, so no interleave is needed).
The tokens are the small MMA dimension (padded to 16). Split-K gives every SM several
programs even for N = 576; partial sums then go through a small reduce kernel.
Zero point: Σ_k a·(q − z) = Σ_k a·q − z·Σ_k a, exact in int32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _decode_step(w_tile, a_tile, k0, k_hi, m_ok, rh, rk, acc, a_sum, BLOCK_M: tl.constexpr, HALF: tl.constexpr,
                 A_FP8: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K:
        p = tl.load(w_tile + k0 // 2)
        a = tl.load(a_tile + k0, mask=m_ok[:, None], other=0.0)
    else:
        p = tl.load(w_tile + k0 // 2, mask=((k0 + 2 * rh) < k_hi)[None, :], other=0)
        a = tl.load(a_tile + k0, mask=m_ok[:, None] & ((k0 + rk) < k_hi)[None, :], other=0.0)
    if A_FP8:
        a = a.to(tl.float32).to(tl.int8)
    ae, ao = tl.split(tl.reshape(a, [BLOCK_M, HALF, 2]))
    lo = (p & 0xF).to(tl.int8)
    hi = (p >> 4).to(tl.int8)
    acc = tl.dot(ae, tl.trans(lo), acc, out_dtype=tl.int32)
    acc = tl.dot(ao, tl.trans(hi), acc, out_dtype=tl.int32)
    a_sum += tl.sum(a.to(tl.int32), axis=1)
    return acc, a_sum


@triton.jit
def w4a8_decode_kernel(
    a_ptr, w_ptr, sx_ptr, sw_ptr, zw_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, stride_am, stride_wn, stride_om, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, A_FP8: tl.constexpr, EVEN_K: tl.constexpr,
):
    """v2: the packed weight tile is [BLOCK_N, BLOCK_K/2] bytes, contiguous along K (16-byte
    vector loads, BLOCK_K/2 ≥ 128 bytes per row); the activations are one contiguous
    [BLOCK_M, BLOCK_K] load split into even/odd columns in registers (v1 loaded them with
    stride 2, one byte at a time)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rn_safe = tl.where(n_ok, rn, 0)  # clamp rows instead of masking: unmasked 16-byte loads
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    a_sum = tl.zeros([BLOCK_M], dtype=tl.int32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    # this split's own tile count (the last split may be shorter: run 2 read past k_hi there)
    iters = (k_hi - k_lo + BLOCK_K - 1) // BLOCK_K
    w_tile = w_ptr + rn_safe[:, None].to(tl.int64) * stride_wn + rh[None, :]  # [BLOCK_N, HALF]
    a_tile = a_ptr + rm[:, None] * stride_am + rk[None, :]  # [BLOCK_M, BLOCK_K]
    if _INTERPRET:  # Triton 3.6's interpreter cannot run `range` over a runtime bound
        i = 0
        while i < iters:
            acc, a_sum = _decode_step(w_tile, a_tile, k_lo + i * BLOCK_K, k_hi, m_ok, rh, rk, acc, a_sum,
                                      BLOCK_M, HALF, A_FP8, EVEN_K)
            i += 1
    else:
        for i in range(0, iters):
            acc, a_sum = _decode_step(w_tile, a_tile, k_lo + i * BLOCK_K, k_hi, m_ok, rh, rk, acc, a_sum,
                                      BLOCK_M, HALF, A_FP8, EVEN_K)
    zw = tl.load(zw_ptr + rn, mask=n_ok, other=0.0)
    val = acc.to(tl.float32) - a_sum.to(tl.float32)[:, None] * zw[None, :]  # exact integers
    mask_o = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
        y = val * sx[:, None] * sw[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask_o)
    else:
        tl.store(ws_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], val, mask=mask_o)


@triton.jit
def splitk_reduce_kernel(ws_ptr, sx_ptr, sw_ptr, bias_ptr, out_ptr, M, N, stride_om,
                         SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    val = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        val += tl.load(ws_ptr + s * M * N + offs, mask=ok, other=0.0)
    m = offs // N
    n = offs % N
    y = val * tl.load(sx_ptr + m, mask=ok, other=0.0) * tl.load(sw_ptr + n, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + n, y.to(out_ptr.dtype.element_ty), mask=ok)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def decode_config(m: int, n: int, k: int, num_sms: int, block_n: int = 64, block_k: int = 512,
                  waves: int = 4, num_warps: int = 4, num_stages: int = 3) -> dict[str, int]:
    """Tile sizes and split-K: enough programs (≥ `waves` per SM) that the weight stream
    saturates HBM. Defaults from the H100 sweep in results/kernels (bench --level kernel)."""
    while block_k > 64 and k % block_k:
        block_k //= 2
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split_k = 1
    while n_tiles * split_k < waves * num_sms and split_k * 2 <= min(32, k_tiles):
        split_k *= 2
    return {"BLOCK_M": max(16, triton.next_power_of_2(m)), "BLOCK_N": block_n, "BLOCK_K": block_k,
            "SPLIT_K": split_k, "num_warps": num_warps, "num_stages": num_stages}


_WS: dict[torch.device, torch.Tensor] = {}


def _workspace(numel: int, device: torch.device) -> torch.Tensor:
    buf = _WS.get(device)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=torch.float32, device=device)
        _WS[device] = buf
    return buf


def w4a8_decode(a: torch.Tensor, s_x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor,
                w_zero: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                config: dict[str, int] | None = None, **tune: int) -> torch.Tensor:
    """a int8/e4m3 [M, K] (M ≤ 64), packed uint8 [N, K/2] -> y [M, N] out_dtype."""
    m, k = a.shape
    n = packed.shape[0]
    if m > 64:
        raise ValueError(f"the decode kernel takes at most 64 tokens, got {m}")
    if a.stride(-1) != 1:
        a = a.contiguous()
    cfg = dict(config or decode_config(m, n, k, _num_sms(a.device), **tune))
    split_k = cfg["SPLIT_K"]
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    ws = _workspace(split_k * m * n, a.device) if split_k > 1 else out
    has_bias = bias is not None
    w4a8_decode_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split_k)](
        a, packed, s_x, w_scale, w_zero, bias if has_bias else out, out, ws,
        m, n, k, a.stride(0), packed.stride(0), out.stride(0), k_per_split,
        HAS_BIAS=has_bias, A_FP8=a.dtype == torch.float8_e4m3fn, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg,
    )
    if split_k > 1:
        block = 1024
        splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            ws, s_x, w_scale, w_zero if not has_bias else bias, out, m, n, out.stride(0),
            SPLIT_K=split_k, BLOCK=block, HAS_BIAS=has_bias, num_warps=4,
        )
    return out
