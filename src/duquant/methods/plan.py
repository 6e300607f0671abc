"""What a method decides for one linear group: plain tensors, no side effects."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupTransform:
    """The transform of one activation (all float64 / int64, on the CPU).

    smooth: s, the activation is divided by s and the weight's input columns multiplied by it;
        folded offline into the producer of the activation.
    rot1, perm, rot2, hadamard: the online orthogonal transform G (see OnlineTransform).
    """

    smooth: torch.Tensor | None = None
    rot1: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    rot2: torch.Tensor | None = None
    hadamard: bool = False

    @property
    def has_online(self) -> bool:
        return self.rot1 is not None or self.perm is not None or self.rot2 is not None or self.hadamard
