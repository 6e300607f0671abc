"""Prefill GEMM on 8-bit tensor cores: y = s_x[t]·s_w[j]·Σ_k a[t,k]·b[j,k] (+ bias), bf16 out.

a = q_x − z_x and b = q_w − z_w lie in [−15, 15], exact in int8 and in float8 e4m3, so the
GEMM needs no zero-point terms. Two carriers:
  * INT8: this Triton kernel (wgmma s8, exact int32 accumulation) with the scale epilogue
    fused;
  * FP8: `torch._scaled_mm` (cuBLAS e4m3 with row-wise scales, bf16 out). Its float
    accumulation is exact here only while partial sums stay small; cuBLAS's default
    (use_fast_accum=False) promotes to fp32 periodically, which keeps integer sums of
    |a·b| ≤ 225 over K ≤ 11008 (< 2^22) exact in practice.
Which is faster is measured by `duquant.bench.kernels` and recorded in results/kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _configs() -> list[triton.Config]:
    shapes = [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (256, 128, 128, 8, 3), (64, 128, 128, 4, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def int8_gemm_kernel(
    a_ptr, b_ptr, sx_ptr, sw_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm, M_BUCKET,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share their column tiles of b while they sit in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    size = tl.minimum(grid_m - group * GROUP_M, GROUP_M)
    pid_m = group * GROUP_M + (pid % width) % size
    pid_n = (pid % width) // size
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Wrap out-of-range rows/columns onto valid ones: loads need no mask, stores are masked.
    ram = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    rbn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + ram[:, None].to(tl.int64) * stride_am + rk[None, :]
    b_ptrs = b_ptr + rbn[None, :].to(tl.int64) * stride_bn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = rk < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sx = tl.load(sx_ptr + ram)
    sw = tl.load(sw_ptr + rbn)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rbn).to(tl.float32)[None, :]
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


def int8_gemm(a: torch.Tensor, s_x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a int8 [M, K], w8 int8 [N, K] -> [M, N] out_dtype with the per-token × per-channel epilogue."""
    m, k = a.shape
    n = w8.shape[0]
    a = a if a.stride(-1) == 1 else a.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    int8_gemm_kernel[grid](a, w8, s_x, w_scale, bias if bias is not None else out, out, m, n, k,
                           a.stride(0), w8.stride(0), out.stride(0), min(triton.next_power_of_2(m), 4096),
                           HAS_BIAS=bias is not None)
    return out


def fp8_gemm(a: torch.Tensor, s_x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             fast_accum: bool = False) -> torch.Tensor:
    """a e4m3 [M, K], w8 e4m3 [N, K] -> [M, N] through cuBLAS with row-wise scales.

    cuBLAS wants M, N, K multiples of 16 (callers route other M to `int8_gemm`).
    """
    # cuBLAS's row-wise scaling emits bf16 only: an fp16 model gets one extra cast.
    y = torch._scaled_mm(a, w8.t(), scale_a=s_x.reshape(-1, 1), scale_b=w_scale.reshape(1, -1),
                         out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    y = y if out_dtype == torch.bfloat16 else y.to(out_dtype)
    if bias is not None:
        y += bias.to(y.dtype)
    return y


@triton.jit
def expand_w4_kernel(packed_ptr, zero_ptr, out_ptr, N, K_HALF, BLOCK: tl.constexpr):
    """Packed codes [N, K/2] -> q − z as int8 or e4m3 [N, K] (one row-block per program)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < K_HALF
    p = tl.load(packed_ptr + row.to(tl.int64) * K_HALF + cols, mask=ok, other=0)
    z = tl.load(zero_ptr + row)
    lo = (p & 0xF).to(tl.float32) - z
    hi = (p >> 4).to(tl.float32) - z
    both = tl.interleave(lo, hi)
    out_cols = tl.program_id(1) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + row.to(tl.int64) * 2 * K_HALF + out_cols, both.to(out_ptr.dtype.element_ty),
             mask=out_cols < 2 * K_HALF)


def expand_w4(packed: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Transient 8-bit copy of b = q − z for a prefill GEMM on weights kept only packed."""
    n, k_half = packed.shape
    out = torch.empty((n, 2 * k_half), dtype=dtype, device=packed.device) if out is None else out
    block = 1024
    expand_w4_kernel[(n, triton.cdiv(k_half, block))](packed, zero, out, n, k_half, BLOCK=block, num_warps=4)
    return out
