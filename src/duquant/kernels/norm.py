"""What a transform kernel can absorb from the op before it, and the references: the
RMSNorm in front of q/k/v and gate/up (`InputNorm`), and SwiGLU's silu(gate)·up in front
of down_proj (`swiglu_ref`).

A LLaMA decoder layer normalises the residual stream x before q/k/v and before gate/up:
RMSNorm(x) = w · x / rms(x), rms(x) = sqrt(mean(x²) + eps) per token. Each of those
activations is then quantized per token. So the transform kernel can read x itself, sum
x² on the way and normalise the row before its transform: the norm's own kernels (and
their passes over the activation) disappear from the W4A4 layer. The kernels round the
normalised row as transformers does (`triton_fused_input`): in exact arithmetic per-token
quantization ignores the 1/rms factor, but quantizing unrounded x·w instead moved
SmolLM2's perplexity by 0.3% (session 11).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class InputNorm(NamedTuple):
    """An RMSNorm in front of a quantized linear: weight [K] (None: no weight) and eps."""

    weight: torch.Tensor | None
    eps: float


def rms_norm_ref(x: torch.Tensor, norm: InputNorm) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then multiply by w."""
    xf = x.to(torch.float32)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)
    return y if norm.weight is None else norm.weight.to(x.dtype) * y


def check_one_fused_op(norm: InputNorm | None, up: torch.Tensor | None) -> None:
    """A transform absorbs the norm in front of it or the SwiGLU product, never both (no
    LLaMA activation has both, and their order would be ambiguous)."""
    if norm is not None and up is not None:
        raise ValueError("a transform absorbs an RMSNorm or a SwiGLU product, not both")


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """transformers' LLaMA MLP activation: silu(gate) · up, in the inputs' dtype."""
    return torch.nn.functional.silu(gate) * up
