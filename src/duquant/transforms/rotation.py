"""DuQuant's greedy block rotation (Algorithm 1, Eq. 2).

For one block of n channels the rotation is built greedily: find the channel holding the
largest |x|, swap it to position 0, multiply by a fixed orthogonal matrix whose first row
is uniform (so that channel is spread evenly over all n channels) followed by a random
rotation of the remaining n−1 channels, swap back. Repeat N times and keep the prefix of
the product that gave the smallest outlier, so the result is never worse than identity.
One block matrix, built on the block holding the largest outlier, is shared by all blocks
of the layer (Remark 2).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from .hadamard import random_orthogonal


def uniform_first_row_basis(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A deterministic orthogonal matrix whose first row is 1/√n (Helmert's matrix).

    Row k (k ≥ 1) is the normalised contrast (1, …, 1, −k, 0, …, 0) of the first k+1 entries.
    """
    basis = torch.zeros(n, n, dtype=dtype)
    basis[0] = 1.0 / math.sqrt(n)
    for k in range(1, n):
        norm = math.sqrt(k * (k + 1))
        basis[k, :k] = 1.0 / norm
        basis[k, k] = -k / norm
    return basis


def _outlier_criterion(x: torch.Tensor, criterion: str) -> torch.Tensor:
    if criterion == "absmax":
        return x.abs().amax()
    return x.amax() - x.amin()  # "range": the reference code's max − min of signed values


def _outlier_channel(x: torch.Tensor, exchange: str) -> int:
    flat = int(x.abs().argmax())
    row, col = divmod(flat, x.shape[1])
    # "row" reproduces the reference code, which swaps the channel at the row index mod n.
    return col if exchange == "column" else row % x.shape[1]


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The greedy loop is hundreds of tiny ops: on the CPU, thread hand-offs cost more than the math."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def greedy_rotation(
    x: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    exchange: str = "column",
    criterion: str = "absmax",
) -> torch.Tensor:
    """Greedy rotation (n×n, float64) for the activation block `x` of shape [tokens, n]."""
    with _one_cpu_thread(x.device):
        return _greedy_rotation(x, steps, generator, exchange, criterion)


def _greedy_rotation(x, steps, generator, exchange, criterion) -> torch.Tensor:
    n = x.shape[1]
    work = x.to(torch.float32)
    # R̃·Q with Q = diag(1, Q'): one random Q' per fitted rotation, as in the reference code.
    q = torch.eye(n, dtype=torch.float64)
    q[1:, 1:] = random_orthogonal(n - 1, generator)
    step_matrix = (uniform_first_row_basis(n) @ q).to(x.device)
    total = torch.eye(n, dtype=torch.float64, device=x.device)
    best, best_value = total.clone(), _outlier_criterion(work, criterion)
    index = torch.arange(n, device=x.device)
    for _ in range(steps):
        d = _outlier_channel(work, exchange)
        swap = index.clone()
        swap[0], swap[d] = d, 0
        step = step_matrix[swap][:, swap]  # E_d · R̃Q · E_d
        work = work @ step.to(work.dtype)
        total = total @ step
        value = _outlier_criterion(work, criterion)
        if value < best_value:
            best, best_value = total.clone(), value
    return best


def block_view(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., C] -> [..., C/n, n]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def rotate_blocks(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Multiply every block of n channels of `x` by the same n×n `rotation`."""
    n = rotation.shape[0]
    return (block_view(x, n) @ rotation.to(x.dtype)).reshape(x.shape)


def fit_block_rotation(
    x: torch.Tensor,
    block_size: int,
    steps: int,
    generator: torch.Generator,
    exchange: str = "column",
    criterion: str = "absmax",
) -> torch.Tensor:
    """Shared block rotation for activation `x` [tokens, C]: fitted on the block with the largest |x|."""
    blocks = block_view(x, block_size)  # [T, K, n]
    worst_block = int(blocks.abs().amax(dim=(0, 2)).argmax())
    return greedy_rotation(blocks[:, worst_block, :], steps, generator, exchange, criterion)


def auto_block_size(channels: int, preferred: int = 128) -> int:
    """Largest power of two ≤ `preferred` that divides `channels`."""
    size = preferred
    while size > 1 and channels % size:
        size //= 2
    return size
