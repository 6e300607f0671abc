"""SmoothQuant-style smoothing: move activation outliers into the weights.

With s_j = max|X_j|^α / max|W_j|^(1−α), the product is unchanged:
    X·Wᵀ = (X / s) · (W · s)ᵀ
and the smoothed activation X / s has a flatter channel range. `s` is folded offline
into whatever produces X (an RMSNorm scale, or the output rows of a linear layer).
"""
from __future__ import annotations

import torch

# Lower bound on s: a dead channel (max|X| = 0) must not produce s = 0 and a division by zero.
_MIN_SCALE = 1e-5


def weight_input_absmax(weights: list[torch.Tensor], statistic: str = "group") -> torch.Tensor:
    """Per-input-channel max|W| of the linears that read one activation.

    "group" takes the max over every weight of the group (SmoothQuant, DuQuant paper);
    "first" uses the first weight only (q_proj for q/k/v, as the DuQuant reference code).
    """
    chosen = weights if statistic == "group" else weights[:1]
    return torch.stack([w.detach().abs().amax(dim=0).double() for w in chosen]).amax(dim=0)


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1−α) in float64, bounded away from zero."""
    act = act_absmax.double().clamp(min=_MIN_SCALE)
    weight = weight_absmax.double().clamp(min=_MIN_SCALE)
    return (act.pow(alpha) / weight.pow(1.0 - alpha)).clamp(min=_MIN_SCALE)
