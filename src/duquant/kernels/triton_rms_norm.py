"""transformers' RMSNorm in one kernel, for the passes that run whole layers in the model
dtype (calibration above all).

LlamaRMSNorm (and Mistral's, Qwen2's, ...) computes w · (x·rsqrt(mean(x²) + eps)).to(dtype)
as six PyTorch kernels over a float32 copy of the activation: about 13 ms per norm of one
8 × 2048-token batch of a 7B layer on the H100, twice per layer and pass, where one read
and one write of the activation take ~1.5 ms. This kernel does the same arithmetic in one
pass: the sum of x² in float32, the normalised row rounded to x's dtype, then the product
with w rounded to the promoted output dtype (PyTorch's `w * y` of two half tensors is a
float32 product rounded once, so that step is identical). Only the order of the sum and
the rsqrt's last bit can differ from PyTorch's, which moves a result by at most one unit in
the last place now and then.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from duquant.kernels.triton_fused_input import inverse_rms, rms_normalized

MAX_K = 16384  # a whole row sits in registers


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, M, K, stride_x, stride_o, eps,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, HAS_W: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    ok = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    xf = x.to(tl.float32)
    r = inverse_rms(tl.sum(xf * xf, axis=1), K, eps)
    w = tl.load(w_ptr + cols, mask=cols < K, other=0.0)[None, :] if HAS_W else 0.0
    # W_DT float32: no rounding of w·y here; the store rounds it to the promoted output dtype
    y = rms_normalized(xf, r[:, None], w, x.dtype, tl.float32, HAS_W)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def supported(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Rows of at most MAX_K channels in a float dtype, a weight of one value per channel."""
    k = x.shape[-1] if x.dim() else 0
    if not 0 < k <= MAX_K or x.dtype not in _DTYPES:
        return False
    return weight is None or (weight.shape == (k,) and weight.dtype in _DTYPES and weight.device == x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """weight · (x / sqrt(mean(x²) + eps)) over the last dimension, rounded as transformers'
    LlamaRMSNorm rounds it; the output dtype is x's promoted with weight's. Call only where
    `supported` says so."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    m = x2.shape[0]
    if m:
        block_k = triton.next_power_of_2(k)
        rows = max(1, min(16, 4096 // block_k))  # ~4096 elements per program
        rms_norm_kernel[(triton.cdiv(m, rows),)](
            x2, weight if weight is not None else out, out, m, k, x2.stride(0), out.stride(0), float(eps),
            ROWS=rows, BLOCK_K=block_k, HAS_W=weight is not None, num_warps=8 if block_k >= 4096 else 4)
    return out.view(x.shape)
