"""The simulated quantizer's activation path in one kernel: cast to the model dtype, then
per-row fake quantization, bit for bit what `quant.quantizer.fake_quantize(y.to(dtype), spec)`
computes with PyTorch ops.

Why: calibration runs every quantized layer in simulated form over the whole calibration set
(128 × 2048 tokens), and there the PyTorch quantizer is a chain of ~10 elementwise passes over
a float32 copy of the activation (cast, cast back, min/max, divide, round, add, clamp,
subtract, multiply, cast): on the H100 about 0.3 s per LLaMA-2-7B layer
(results/bench_h100/session5/profile/). This kernel reads the transform's float32 output once
and writes the model-dtype result once.

Bit-exactness: the same float32 operations in the same order. Tensor-by-tensor division is
IEEE (`div_rn`, as PyTorch's); a division by a Python number (the range by 2^b − 1) is IEEE
on the CPU, but on CUDA PyTorch multiplies by the float32 reciprocal instead (ATen's
div_true_kernel_cuda), so the kernel does whichever its device's PyTorch does (RECIPROCAL; the
first GPU run, which divided, differed in a few rows). Rounding is half-to-even (libdevice
rint), and fp contraction is off at launch (a multiply followed by an add must not become one
FMA, which rounds once).
A program holds whole rows (K ≤ 16384; several short rows, e.g. attention heads) in registers
between the min/max and the quantization.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from duquant.kernels.triton_quant import rint as rint_interpretable

_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
MAX_K = 16384


@triton.jit
def _rint(v):
    if _INTERPRET:  # libdevice does not run in the interpreter (exact for |v| < 2^22)
        return rint_interpretable(v)
    return libdevice.rint(v)


@triton.jit
def _over(v, d, inv_d, RECIPROCAL: tl.constexpr):
    """v / d for a Python-number divisor d, as PyTorch on this device computes it."""
    if RECIPROCAL:
        return v * inv_d
    return tl.math.div_rn(v, d)


@triton.jit
def quantize_rows(x, ok, clip, qmax, divisor, inv_divisor, min_scale, SYMMETRIC: tl.constexpr,
                  RECIPROCAL: tl.constexpr):
    """`compute_qparams` + `quantize` of each row of the float32 tile x (entries where `ok`):
    float codes q in [0, qmax] and the row's scale and zero. divisor is 2^(b−1) − 1 (symmetric)
    or 2^b − 1 (asymmetric), a Python number in the quantizer (`quantizer_args`)."""
    if SYMMETRIC:
        amax = tl.max(tl.where(ok, tl.abs(x), 0.0), axis=1) * clip
        scale = tl.maximum(_over(amax, divisor, inv_divisor, RECIPROCAL), min_scale)
        zero = tl.zeros_like(scale) + (qmax + 1.0) * 0.5
    else:
        lo = tl.min(tl.where(ok, x, float("inf")), axis=1) * clip
        hi = tl.max(tl.where(ok, x, float("-inf")), axis=1) * clip
        scale = tl.maximum(_over(hi - lo, divisor, inv_divisor, RECIPROCAL), min_scale)
        zero = -_rint(tl.math.div_rn(lo, scale))
    q = _rint(tl.math.div_rn(x, scale[:, None])) + zero[:, None]
    return tl.minimum(tl.maximum(q, 0.0), qmax), scale, zero


def quantizer_args(bits: int, symmetric: bool, clip: float, min_scale: float) -> tuple[float, ...]:
    """(clip, qmax, divisor, inv_divisor, min_scale) as `quantize_rows` takes them."""
    qmax = (1 << bits) - 1
    divisor = (1 << (bits - 1)) - 1 if symmetric else qmax
    inv_divisor = float(np.float32(1.0) / np.float32(divisor))  # float32 reciprocal, as ATen forms it
    return float(clip), float(qmax), float(divisor), inv_divisor, float(min_scale)


@triton.jit
def fake_quant_rows_kernel(y_ptr, out_ptr, M, K, stride_y, stride_o, clip, qmax, divisor, inv_divisor, min_scale,
                           ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SYMMETRIC: tl.constexpr,
                           RECIPROCAL: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    # y.to(dtype) first: the simulated layer quantizes the transform's output in the model dtype
    v = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=ok, other=0.0)
    x = v.to(out_ptr.dtype.element_ty).to(tl.float32)
    q, scale, zero = quantize_rows(x, ok, clip, qmax, divisor, inv_divisor, min_scale, SYMMETRIC, RECIPROCAL)
    out = ((q - zero[:, None]) * scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], out, mask=ok)


def supported(y: torch.Tensor, out_dtype: torch.dtype, group_size: int) -> bool:
    return (y.dtype in (torch.float32, torch.float16, torch.bfloat16) and out_dtype in (torch.float32, torch.float16,
            torch.bfloat16) and group_size == 0 and 0 < y.shape[-1] <= MAX_K)


def fake_quantize_rows(y: torch.Tensor, out_dtype: torch.dtype, bits: int, symmetric: bool, clip: float,
                       min_scale: float) -> torch.Tensor:
    """fake_quantize(y.to(out_dtype), QuantSpec(bits, symmetric, clip)) per row of y [..., K]."""
    k = y.shape[-1]
    y2 = y.reshape(-1, k)
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    m = y2.shape[0]
    out = torch.empty(y2.shape, dtype=out_dtype, device=y.device)
    if m:
        block = triton.next_power_of_2(k)
        rows = max(1, 2048 // block)  # short rows (attention heads): several per program
        fake_quant_rows_kernel[(triton.cdiv(m, rows),)](
            y2, out, m, k, y2.stride(0), out.stride(0), *quantizer_args(bits, symmetric, clip, min_scale), ROWS=rows, BLOCK_K=block, SYMMETRIC=symmetric, RECIPROCAL=y.is_cuda,
            num_warps=4 if rows * block <= 4096 else 8, enable_fp_fusion=False)
    return out.reshape(y.shape)
