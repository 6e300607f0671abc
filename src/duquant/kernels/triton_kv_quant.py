"""The attention operands' quantizer in one kernel per tensor: per (token, head) row, the
optional Q/K Hadamard, then the row quantizer, then either
  * the fake-quantized values (Q at every step; K and V of a forward without a quantized cache), or
  * packed codes + scale + zero stored into a static KV cache (`StaticQuantizedKVCache`) at the
    cache's write position, read from the device (so a CUDA graph replays the next step);
and the cache read that dequantizes the stored codes of all positions.

Why: in PyTorch ops this is ~60 small kernels per decoder layer (the Hadamard as cast, matmul,
cast; min/max, divide, round, clamp, pack, index_copy; unpack, stack, subtract, multiply, cast).
Under a CUDA graph they are launch-free but each still costs a few µs: the 7B-shaped W4A4 model
with 4-bit Q/K/V decoded at 8.3 ms per token against 3.8 ms with BF16 attention (session 10).

Numerics: the quantizer is `compute_qparams` / `quantize` / `dequantize` operation for operation
in float32, as in triton_fake_quant (IEEE divisions between tensors, the reciprocal for the
division by the Python number 2^b − 1 on CUDA, round half to even, no FMA contraction), so codes,
scales and zero points equal PyTorch's for the same input. The Hadamard is (x · H_±1) · (1/√n),
rounded to the model dtype as `apply_hadamard` does: for 16-bit x the product runs on the tensor
cores, where the products x·(±1) are exact and the sums float32; float32 x uses an "ieee" (no
TF32) product. Only the order of the sums (and, for n not a power of 4, the one rounding of
1/√n applied after the sum instead of to each term) can differ from PyTorch's float32 matmul.

Layouts: x [B, H, T, D] with any strides but a unit last one; a cache tensor [B, H, L, D/2]
(packed codes, bits ≤ 4) or [B, H, L, D] (8-bit codes), scale and zero float32 [B, H, L, 1];
the write position is a 0-d int64 device tensor.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from duquant.kernels.triton_fake_quant import _INTERPRET, quantize_rows, quantizer_args

MAX_HEAD_DIM = 128  # the Hadamard tile lives in registers: D × D float32


@triton.jit
def _row_coordinates(pid, H, T, ROWS: tl.constexpr):
    """Rows r = pid·ROWS + i of the flattened [B, H, T] index, and their (b, h, t)."""
    r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    return r, r // (H * T), (r // T) % H, r % T


@triton.jit
def quantize_rows_kernel(x_ptr, had_ptr, out_ptr, codes_ptr, scale_ptr, zero_ptr, pos_ptr,
                         R, H, T, L, D, sxb, sxh, sxt, inv_sqrt_d, clip, qmax, divisor, inv_divisor, min_scale,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HADAMARD: tl.constexpr,
                         SYMMETRIC: tl.constexpr, STORE_CODES: tl.constexpr, PACK: tl.constexpr,
                         RECIPROCAL: tl.constexpr):
    r, b, h, t = _row_coordinates(tl.program_id(0), H, T, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = r < R
    ok = row_ok[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + (b * sxb + h * sxh + t * sxt)[:, None] + cols[None, :], mask=ok, other=0.0)
    v = x.to(tl.float32)
    if HADAMARD:  # apply_hadamard: result in the input's dtype
        hm = tl.load(had_ptr + cols[:, None] * D + cols[None, :], mask=(cols < D)[:, None] & (cols < D)[None, :],
                     other=0.0)  # ±1, in x's dtype (float32 for float32 x)
        if _INTERPRET or x.dtype == tl.float32:  # (the interpreter multiplies 16-bit tiles wrongly)
            s = tl.dot(v, hm.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(x, hm)
        v = (s * inv_sqrt_d).to(x.dtype).to(tl.float32)
    q, scale, zero = quantize_rows(v, ok, clip, qmax, divisor, inv_divisor, min_scale, SYMMETRIC, RECIPROCAL)
    if STORE_CODES:
        position = tl.load(pos_ptr) + t
        row_ok = row_ok & (position < L)  # past the cache's end: dropped (StaticCache raises there)
        dest = (b * H + h) * L + position
        codes = q.to(tl.uint8)
        if PACK:  # two codes per byte, the even channel in the low nibble (quant.packing)
            low, high = tl.split(tl.reshape(codes, [ROWS, BLOCK_D // 2, 2]))
            half = tl.arange(0, BLOCK_D // 2)
            tl.store(codes_ptr + dest[:, None] * (D // 2) + half[None, :], low | (high << 4),
                     mask=row_ok[:, None] & (half < D // 2)[None, :])
        else:
            tl.store(codes_ptr + dest[:, None] * D + cols[None, :], codes, mask=row_ok[:, None] & (cols < D)[None, :])
        tl.store(scale_ptr + dest, scale, mask=row_ok)
        tl.store(zero_ptr + dest, zero, mask=row_ok)
    else:
        out = ((q - zero[:, None]) * scale[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * D + cols[None, :], out, mask=ok)


@triton.jit
def unpack_nibbles(packed, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """[ROWS, BLOCK_D / 2] packed bytes → [ROWS, BLOCK_D] codes, the low nibble first (quant.packing)."""
    return tl.reshape(tl.join(packed & 0x0F, packed >> 4), [ROWS, BLOCK_D])


@triton.jit
def dequantize_rows_kernel(codes_ptr, scale_ptr, zero_ptr, out_ptr, R, D,
                           ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PACK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = r < R
    cols = tl.arange(0, BLOCK_D)
    if PACK:
        half = tl.arange(0, BLOCK_D // 2)
        packed = tl.load(codes_ptr + r[:, None] * (D // 2) + half[None, :],
                         mask=row_ok[:, None] & (half < D // 2)[None, :], other=0)
        codes = unpack_nibbles(packed, ROWS, BLOCK_D)
    else:
        codes = tl.load(codes_ptr + r[:, None] * D + cols[None, :], mask=row_ok[:, None] & (cols < D)[None, :],
                        other=0)
    scale = tl.load(scale_ptr + r, mask=row_ok, other=0.0)
    zero = tl.load(zero_ptr + r, mask=row_ok, other=0.0)
    out = ((codes.to(tl.float32) - zero[:, None]) * scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r[:, None] * D + cols[None, :], out, mask=row_ok[:, None] & (cols < D)[None, :])


def supported(head_dim: int, bits: int, group_size: int) -> bool:
    """Per-row quantizers (no groups) of up to 8 bits, head_dim ≤ MAX_HEAD_DIM (even when packed)."""
    return group_size == 0 and 0 < head_dim <= MAX_HEAD_DIM and (bits > 4 or head_dim % 2 == 0) and bits <= 8


def _rows_per_program(block_d: int) -> int:
    return max(16, 2048 // block_d)  # ≥ 16: the Hadamard product's tile height


def _launch_quantize(x, hadamard, out, codes, scale, zero, position, length, bits, symmetric, clip, min_scale):
    if x.stride(-1) != 1:
        x = x.contiguous()
    b, h, t, d = x.shape
    rows = b * h * t
    if not rows:
        return
    block = max(16, triton.next_power_of_2(d))
    per_program = _rows_per_program(block)
    dummy = scale if out is None else out
    quantize_rows_kernel[(triton.cdiv(rows, per_program),)](
        x, dummy if hadamard is None else hadamard, dummy if out is None else out,
        dummy if codes is None else codes, dummy if scale is None else scale, dummy if zero is None else zero,
        dummy if position is None else position, rows, h, t, length, d, x.stride(0), x.stride(1), x.stride(2),
        1.0 / math.sqrt(d), *quantizer_args(bits, symmetric, clip, min_scale), ROWS=per_program, BLOCK_D=block,
        HADAMARD=hadamard is not None, SYMMETRIC=symmetric, STORE_CODES=codes is not None, PACK=bits <= 4,
        RECIPROCAL=x.is_cuda, num_warps=4, enable_fp_fusion=False)


def fake_quantize_heads(x: torch.Tensor, hadamard: torch.Tensor | None, bits: int, symmetric: bool, clip: float,
                        min_scale: float) -> torch.Tensor:
    """fake_quantize(apply_hadamard(x) if hadamard else x, spec) per row of x [B, H, T, D];
    hadamard is the ±1 D × D matrix (`hadamard_on`) in x's dtype, float32 for float32 x (or None)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_quantize(x, hadamard, out, None, None, None, None, 0, bits, symmetric, clip, min_scale)
    return out


def store_row_codes(x: torch.Tensor, hadamard: torch.Tensor | None, codes: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor, position: torch.Tensor, bits: int, symmetric: bool, clip: float,
                    min_scale: float) -> None:
    """Write the codes of x [B, H, T, D] (after the Hadamard) at cache positions position … position + T − 1."""
    _launch_quantize(x, hadamard, None, codes, scale, zero, position, codes.shape[2], bits, symmetric, clip,
                     min_scale)


def dequantize_row_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, head_dim: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """All rows of a cache tensor (codes [B, H, L, D/2 or D], scale/zero [B, H, L, 1]) as values [B, H, L, D]."""
    out = torch.empty(*codes.shape[:-1], head_dim, dtype=dtype, device=codes.device)
    rows = out.numel() // head_dim
    if rows:
        block = max(16, triton.next_power_of_2(head_dim))
        per_program = _rows_per_program(block)
        dequantize_rows_kernel[(triton.cdiv(rows, per_program),)](
            codes, scale, zero, out, rows, head_dim, ROWS=per_program, BLOCK_D=block,
            PACK=bits <= 4, num_warps=4)
    return out
