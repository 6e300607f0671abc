"""Uniform affine quantization: the one primitive every method and kernel shares.

Conventions (DuQuant Eq. 1):
    Δ = (max − min) / (2^b − 1),   z = −round(min / Δ),
    q = clamp(round(x / Δ) + z, 0, 2^b − 1),   x̂ = (q − z) · Δ
where min and max are taken per row (the last dimension, or groups of it) and
multiplied by a clip ratio. The symmetric variant uses Δ = clip·max|x| / (2^(b−1) − 1)
and a fixed zero point z = 2^(b−1), so that codes are always unsigned in [0, 2^b − 1]
and `q − z` is the signed value a tensor core consumes.

All arithmetic is done in float32 (or float64 if the input is float64) and the result
is cast back, so simulated quantization does not depend on the model's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest step allowed; guards rows that are constant (e.g. all zeros).
MIN_SCALE = 1e-8


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    bits: code width (2..8). A spec is never built for 16 bit: 16 means "not quantized"
        and is represented by `None` wherever a spec is optional.
    symmetric: symmetric (zero point fixed at 2^(b-1)) or asymmetric (min/max) range.
    clip: ratio the row's min and max (or abs-max) are multiplied by before computing Δ.
    group_size: 0 quantizes each row as one group; otherwise the last dimension is split
        into groups of this many elements, each with its own scale and zero point.
    """

    bits: int
    symmetric: bool = False
    clip: float = 1.0
    group_size: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"quantization bits must be in 2..8, got {self.bits}")
        if not 0.0 < self.clip <= 1.0:
            raise ValueError(f"clip ratio must be in (0, 1], got {self.clip}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0, got {self.group_size}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View the last dimension as (n_groups, group_size)."""
    if group_size == 0 or group_size == x.shape[-1]:
        return x.unsqueeze(-2)
    if x.shape[-1] % group_size:
        raise ValueError(f"group size {group_size} does not divide dimension {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def compute_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale Δ and zero point z for each row (or group) of `x`.

    Returns tensors of shape `x.shape[:-1] + (n_groups,)` in float32/float64; the zero
    point holds integer values but is kept as float so that it can lie outside the code
    range (a row that is all positive has a negative zero point).
    """
    return _group_qparams(_grouped(x.to(_compute_dtype(x)), spec.group_size), spec)


def _group_qparams(xg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute_qparams` of an already converted and grouped [..., n_groups, group] view."""
    if spec.symmetric:
        half = 1 << (spec.bits - 1)
        amax = xg.abs().amax(dim=-1) * spec.clip
        scale = (amax / (half - 1)).clamp(min=MIN_SCALE)
        zero = torch.full_like(scale, float(half))
    else:
        xmin, xmax = torch.aminmax(xg, dim=-1)  # one pass; the same values as amin and amax
        xmin, xmax = xmin * spec.clip, xmax * spec.clip
        scale = ((xmax - xmin) / spec.qmax).clamp(min=MIN_SCALE)
        zero = -torch.round(xmin / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes in [0, 2^b − 1] (uint8) for `x` given per-row/group parameters."""
    xg = _grouped(x.to(scale.dtype), spec.group_size)
    q = torch.clamp(torch.round(xg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, spec.qmax)
    return q.reshape(x.shape).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int = 0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x̂ = (q − z) · Δ, cast to `dtype` (default: the scale's dtype)."""
    qg = _grouped(codes.to(scale.dtype), group_size)
    x = ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(codes.shape)
    return x if dtype is None else x.to(dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """Quantize and dequantize `x` row-wise (dynamic: parameters from `x` itself).

    `None` means 16 bit: `x` is returned unchanged. It runs in every simulated linear and
    in calibration, so it converts `x` once and works in place on one temporary (2.5×
    faster on CPU than the out-of-place form, bitwise the same).
    """
    if spec is None:
        return x
    xg = _grouped(x.to(_compute_dtype(x)), spec.group_size)
    scale, zero = _group_qparams(xg, spec)
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = xg.div(s).round_().add_(z).clamp_(0, spec.qmax)  # div makes the temporary: x is untouched
    return q.sub_(z).mul_(s).reshape(x.shape).to(x.dtype)
