"""The online part of an activation transform, as an nn.Module.

An `OnlineTransform` is an orthogonal matrix G applied to the activation before it is
quantized: x ↦ x·G. The linear layer that reads the activation holds W·G instead of W, so
    x·Wᵀ = (x·G)·(W·G)ᵀ          (G orthogonal: G·Gᵀ = I).
G is stored as its factors, applied in this order:
    block rotation R̂₁ (one n×n matrix shared by every block of n channels)
    → channel permutation P (x[..., perm])
    → block rotation R̂₂
    → normalised Hadamard of the whole dimension (QuaRot's online Hadamard)
Any factor may be absent. Folding into a weight is the same map applied to the weight's
rows in float64, so activation and weight always see exactly the same G.
"""
from __future__ import annotations

import torch
from torch import nn

from .hadamard import apply_hadamard
from .rotation import rotate_blocks


class OnlineTransform(nn.Module):
    def __init__(
        self,
        in_features: int,
        rot1: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
        rot2: torch.Tensor | None = None,
        hadamard: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        for name, rotation in (("rot1", rot1), ("rot2", rot2)):
            if rotation is not None and in_features % rotation.shape[0]:
                raise ValueError(f"block size {rotation.shape[0]} does not divide {in_features} channels")
            # Stored in float32 by default (half the size of float64, error ~1e-7); activation
            # and weight both use this stored matrix, so they always agree.
            self.register_buffer(name, None if rotation is None else rotation.to(dtype).clone())
        self.register_buffer("perm", None if perm is None else perm.to(torch.int64).clone())
        self.hadamard = hadamard

    @property
    def is_identity(self) -> bool:
        return self.rot1 is None and self.perm is None and self.rot2 is None and not self.hadamard

    def _apply_factors(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.rot1 is not None:
            x = rotate_blocks(x, self.rot1.to(dtype))
        if self.perm is not None:
            x = x.index_select(-1, self.perm.to(x.device))
        if self.rot2 is not None:
            x = rotate_blocks(x, self.rot2.to(dtype))
        if self.hadamard:
            x = apply_hadamard(x)
        return x

    def apply_float(self, x: torch.Tensor) -> torch.Tensor:
        """x·G in float32 (float64 stays float64), not cast back."""
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        return self._apply_factors(x.to(compute), compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·G, computed in float32 (float64 stays float64) and cast back."""
        return self.apply_float(x).to(x.dtype)

    def fold_into_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W·G in float64 for a weight of shape [out, in]."""
        return self._apply_factors(weight.to(torch.float64), torch.float64)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}"]
        if self.rot1 is not None:
            parts.append(f"block={self.rot1.shape[0]}")
        parts += [name for name in ("rot1", "perm", "rot2") if getattr(self, name) is not None]
        if self.hadamard:
            parts.append("hadamard")
        return ", ".join(parts)


def same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Both absent, or equal in shape, dtype, device and every value."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def same_transform(a: OnlineTransform | None, b: OnlineTransform | None) -> bool:
    """Whether two (possibly absent) transforms compute the same x·G."""
    if a is None or b is None:
        return a is None and b is None
    return a.hadamard == b.hadamard and all(same_tensor(getattr(a, n), getattr(b, n)) for n in ("rot1", "perm", "rot2"))
