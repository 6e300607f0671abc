"""The ops a transform kernel absorbs (`norm.py`), in Triton, rounded where transformers
rounds them, so that a fused kernel quantizes the very numbers the simulated model does.

transformers runs LlamaRMSNorm and the MLP's silu(gate)·up in the model dtype (fp16/bf16):
  RMSNorm:  y = (x·rsqrt(mean(x²) + eps)).to(dtype), then w·y rounded again;
  SwiGLU:   silu(gate) rounded to dtype, then the product with up rounded again.
Session 11's fused kernels formed both in float32 and left the 1/rms factor for the scale
(per-token quantization ignores it in exact arithmetic). The codes then differed from the
simulated model's wherever a value sat near a rounding boundary, and SmolLM2's fused
perplexity was 0.5% off the simulated one (the norms +0.28%, SwiGLU +0.14%,
results/real_backend/session11/). In float32 models every rounding here is a no-op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def inverse_rms(sum_sq, K, eps):
    """1/rms of a row from its Σx² (float32), as every RMSNorm kernel here computes it."""
    return tl.math.rsqrt(sum_sq / K + eps)


@triton.jit
def rms_normalized(xf, rinv, w, DT: tl.constexpr, W_DT: tl.constexpr, HAS_W: tl.constexpr):
    """transformers' RMSNorm output for float32 x, 1/rms `rinv` (broadcast to x) and weight w:
    the normalised row rounded to DT (x's dtype), then w·y rounded to the promoted dtype
    (a float32 weight promotes the product to float32). Returned as float32."""
    y = (xf * rinv).to(DT).to(tl.float32)
    if HAS_W:
        y = w.to(tl.float32) * y
        if W_DT != tl.float32:
            y = y.to(DT).to(tl.float32)
    return y


@triton.jit
def swiglu_rounded(gate, up, DT: tl.constexpr):
    """silu(gate)·up (float32 in and out) rounded as PyTorch rounds it in dtype DT."""
    s = (gate * tl.sigmoid(gate)).to(DT).to(tl.float32)
    return (s * up).to(DT).to(tl.float32)


@triton.jit
def row_rms_inverse_kernel(x_ptr, out_ptr, M, K, stride_x, eps, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m] = 1/rms(x[m]); the row's chunks are added in order (the same bits every run)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros([ROWS, BLOCK_K], tl.float32)
    k0 = 0
    while k0 < K:  # (a while loop: the CPU interpreter cannot range over a runtime int)
        ok = (rows < M)[:, None] & (k0 + cols < K)[None, :]
        xf = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + cols)[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += xf * xf
        k0 += BLOCK_K
    tl.store(out_ptr + rows, inverse_rms(tl.sum(acc, axis=1), K, eps), mask=rows < M)


def row_rms_inverse(x2: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """1/rms per row of a row-contiguous [M, K] x, float32 [M] (into `out` if given): the
    pass in front of a kernel that normalises blocks of a row it never holds whole."""
    m, k = x2.shape
    out = torch.empty(m, dtype=torch.float32, device=x2.device) if out is None else out
    block_k = min(triton.next_power_of_2(k), 4096)
    rows = max(1, min(16, 4096 // block_k))
    row_rms_inverse_kernel[(triton.cdiv(m, rows),)](x2, out, m, k, x2.stride(0), float(eps), ROWS=rows,
                                                    BLOCK_K=block_k, num_warps=4)
    return out
