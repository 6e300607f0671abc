"""DuQuant's zigzag permutation (Theorem 2, Eq. 4).

Channels are sorted by their (rotated) abs-max and dealt to the K blocks in the order
0, 1, …, K−1, K−1, …, 1, 0, 0, 1, … so each block gets a balanced share of large and
small channels, which lowers the variance of the per-block mean abs-max (Eq. 4) and lets
the second block rotation spread what remains.
"""
from __future__ import annotations

import torch


def zigzag_permutation(channel_absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """Index vector `perm` (int64, length C): the permuted activation is `x[..., perm]`."""
    channels = channel_absmax.numel()
    n_blocks = channels // block_size
    order = torch.argsort(channel_absmax.double(), descending=True, stable=True)
    rank = torch.arange(channels)
    sweep, pos = rank // n_blocks, rank % n_blocks
    block = torch.where(sweep % 2 == 0, pos, n_blocks - 1 - pos)
    # Stable sort by block keeps, inside each block, the descending order of assignment.
    return order[torch.argsort(block, stable=True)]


def block_mean_variance(channel_absmax: torch.Tensor, block_size: int, perm: torch.Tensor | None = None) -> float:
    """Eq. 4: variance over blocks of the mean channel abs-max inside each block."""
    values = channel_absmax.double() if perm is None else channel_absmax.double()[perm]
    return float(values.reshape(-1, block_size).mean(dim=1).var(unbiased=False))
