"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the not-yet-quantized columns through the inverse Hessian of the
layer's reconstruction loss ‖XWᵀ − XŴᵀ‖², H = 2/N·XᵀX.

Quantization parameters come from the shared `compute_qparams`, so clip ratio,
symmetric/asymmetric and group size behave exactly as for RTN; with an identity Hessian
GPTQ reduces to RTN (no error is propagated).
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch

from .quantizer import QuantSpec, compute_qparams, quantize

logger = logging.getLogger(__name__)

# Cholesky retries, each with ten times the previous damping.
_MAX_DAMP_RETRIES = 4


class HessianAccumulator:
    """Running H = 2/N·Σ xᵀx over all rows seen, kept as a mean so it never grows with N."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Add the rows of `x` ([..., in_features], any float dtype)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dimension {self.in_features}, got {x.shape[-1]}")
        rows = x.detach().reshape(-1, self.in_features).to(device=self._h.device, dtype=torch.float32)
        if rows.shape[0] == 0:
            return
        total = self.nsamples + rows.shape[0]
        self._h.mul_(self.nsamples / total)
        rows = rows * math.sqrt(2.0 / total)  # scale before the product: no large partial sums
        self._h.addmm_(rows.T, rows)
        self.nsamples = total

    @property
    def hessian(self) -> torch.Tensor:
        return self._h


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H), raising λ on failure."""
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        lam = damp * 10**attempt * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0 and torch.isfinite(upper).all():
                return upper
        logger.warning("GPTQ: Hessian not positive definite with damp=%g, retrying with %g",
                       damp * 10**attempt, damp * 10 ** (attempt + 1))
    raise RuntimeError(f"GPTQ: Cholesky failed even with damp={damp * 10**_MAX_DAMP_RETRIES:g}")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `weight` [out, in] given the input Hessian [in, in].

    Returns (codes uint8 [out, in], scale [out, n_groups], zero [out, n_groups]) in
    float32, with codes in the original column order; `dequantize(codes, scale, zero,
    spec.group_size)` is the quantized weight. Without act_order each group's parameters
    are computed when GPTQ reaches the group (from the error-updated weights, as GPTQ
    does); with act_order they are fixed beforehand from the weight in original column
    order ("static groups"), so the [out, in/group] layout is unchanged.
    """
    out_features, in_features = weight.shape
    gs = spec.group_size if spec.group_size not in (0, in_features) else 0
    if gs and in_features % gs:
        raise ValueError(f"group size {gs} does not divide in_features {in_features}")
    n_groups = in_features // gs if gs else 1
    column_spec = replace(spec, group_size=0)  # parameters handed in per column

    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()
    # An input that is always zero carries no information: pin its Hessian row, drop its weight.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    dynamic_groups = gs > 0 and not act_order
    scale = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    if not dynamic_groups:
        scale[:], zero[:] = compute_qparams(w, spec)

    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp)
    order = perm.tolist() if perm is not None else range(in_features)  # no device sync per column

    # Lazy batching is exact for any block size; keep whole groups inside one block so that
    # a group's parameters see all the error already pushed onto it.
    if dynamic_groups:
        block_size = gs * max(1, block_size // gs)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            j = b0 + i  # position in the (possibly permuted) order
            col = order[j]
            g = col // gs if gs else 0
            if dynamic_groups and j % gs == 0:
                scale[:, g], zero[:, g] = (t[:, 0] for t in compute_qparams(wb[:, i : i + gs], spec))
            s, z = scale[:, g : g + 1], zero[:, g : g + 1]
            q = quantize(wb[:, i : i + 1], s, z, column_spec)
            codes[:, col] = q[:, 0]
            deq = (q.to(torch.float32) - z) * s
            e = (wb[:, i : i + 1] - deq) / hb[i, i]
            wb[:, i:] -= e * hb[i : i + 1, i:]
            err[:, i : i + 1] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return codes, scale, zero
