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
from contextlib import nullcontext

import torch

from ..cuda_graphs import capture
from .cpu_threads import one_cpu_thread
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
    """Per block of the batch x [B, T, n] -> [B]."""
    if criterion == "absmax":
        return x.abs().amax(dim=(1, 2))
    return x.amax(dim=(1, 2)) - x.amin(dim=(1, 2))  # "range": the reference code's max − min of signed values


def _outlier_channel(x: torch.Tensor, exchange: str) -> torch.Tensor:
    """Channel to swap to position 0, per block of x [B, T, n] -> int64 [B] (on x's device)."""
    n = x.shape[-1]
    flat = x.abs().flatten(1).argmax(dim=1)
    # "row" reproduces the reference code, which swaps the channel at the row index mod n.
    return flat % n if exchange == "column" else (flat // n) % n


def greedy_rotation(
    x: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    exchange: str = "column",
    criterion: str = "absmax",
) -> torch.Tensor:
    """Greedy rotation (n×n, float64) for the activation block `x` of shape [tokens, n]."""
    return greedy_rotations(x.unsqueeze(0), steps, [generator], exchange, criterion)[0]


def greedy_rotations(
    xs: torch.Tensor,
    steps: int,
    generators: list[torch.Generator],
    exchange: str = "column",
    criterion: str = "absmax",
) -> torch.Tensor:
    """Independent greedy rotations of B blocks at once: xs [B, tokens, n] -> [B, n, n] float64.

    Block b draws its random Q' from generators[b], so the result of each block does not
    depend on the others. The loop is batched and never reads a value back to the host:
    on a GPU it is a stream of small kernels (a LLaMA-2-7B layer fits 8 rotations of 256
    steps; one at a time, with a host sync per step, that took longer than the math).
    """
    # on the CPU the loop is hundreds of tiny ops: thread hand-offs cost more than the math
    with one_cpu_thread() if xs.device.type == "cpu" else nullcontext():
        return _greedy_rotations(xs, steps, generators, exchange, criterion)


def _step_matrices(n: int, generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    # R̃·Q with Q = diag(1, Q'): one random Q' per fitted rotation, as in the reference code.
    # Built on the CPU on one thread, wherever the loop runs (`cpu_threads`: fast and the same
    # on every machine).
    with one_cpu_thread():
        basis = uniform_first_row_basis(n)
        mats = []
        for generator in generators:
            q = torch.eye(n, dtype=torch.float64)
            q[1:, 1:] = random_orthogonal(n - 1, generator)
            mats.append(basis @ q)
    return torch.stack(mats).to(device)


def _greedy_rotations(xs, steps, generators, exchange, criterion) -> torch.Tensor:
    b, _, n = xs.shape
    work = xs.to(torch.float32, copy=True)  # the loop updates it in place: never the caller's tensor
    step_matrix = _step_matrices(n, generators, xs.device)  # [B, n, n]
    total = torch.eye(n, dtype=torch.float64, device=xs.device).expand(b, n, n).clone()
    best, best_value = total.clone(), _outlier_criterion(work, criterion)
    index = torch.arange(n, device=xs.device).expand(b, n)

    def step() -> None:  # in place on work/total/best/best_value, so a CUDA graph can replay it
        d = _outlier_channel(work, exchange).unsqueeze(1)  # [B, 1]
        # E_d: the permutation that swaps positions 0 and d
        swap = torch.where(index == 0, d, torch.where(index == d, 0, index))
        mat = step_matrix.gather(1, swap.unsqueeze(2).expand(b, n, n))
        mat = mat.gather(2, swap.unsqueeze(1).expand(b, n, n))  # E_d · R̃Q · E_d
        work.copy_(torch.bmm(work, mat.to(work.dtype)))
        total.copy_(torch.bmm(total, mat))
        value = _outlier_criterion(work, criterion)
        better = value < best_value  # strict: on a tie the shorter prefix stays
        best.copy_(torch.where(better.view(b, 1, 1), total, best))
        best_value.copy_(torch.where(better, value, best_value))

    _repeat(step, steps, xs.device)
    return best


# Eager steps before a CUDA graph is captured (they warm up cuBLAS on a side stream, as graph
# capture requires), and the fewest steps for which capturing pays off.
_GRAPH_WARMUP, _GRAPH_MIN_STEPS = 2, 16


def _repeat(step, steps: int, device: torch.device) -> None:
    """Run step() `steps` times. On a GPU the step (~15 tiny kernels, no host sync) is
    captured once as a CUDA graph and replayed: the greedy loop of one LLaMA-2-7B layer is
    ~1000 steps, and in eager mode their launches cost far more than their math. The same
    kernels run in the same order either way."""
    if device.type != "cuda" or steps < _GRAPH_MIN_STEPS:
        for _ in range(steps):
            step()
        return
    graph, _ = capture(step, _GRAPH_WARMUP, device=device)  # the warm-up calls are the first steps
    for _ in range(steps - _GRAPH_WARMUP):
        graph.replay()


def block_view(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., C] -> [..., C/n, n]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def rotate_blocks(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Multiply every block of n channels of `x` by the same n×n `rotation`."""
    n = rotation.shape[0]
    return (block_view(x, n) @ rotation.to(x.dtype)).reshape(x.shape)


def worst_block(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The [tokens, n] block of activation x [tokens, C] holding the largest |x|."""
    blocks = block_view(x, block_size)  # [T, K, n]
    return blocks[:, int(blocks.abs().amax(dim=(0, 2)).argmax()), :]


def fit_block_rotation(
    x: torch.Tensor,
    block_size: int,
    steps: int,
    generator: torch.Generator,
    exchange: str = "column",
    criterion: str = "absmax",
) -> torch.Tensor:
    """Shared block rotation for activation `x` [tokens, C]: fitted on the block with the largest |x|."""
    return greedy_rotation(worst_block(x, block_size), steps, generator, exchange, criterion)


def auto_block_size(channels: int, preferred: int = 128) -> int:
    """Largest power of two ≤ `preferred` that divides `channels`."""
    size = preferred
    while size > 1 and channels % size:
        size //= 2
    return size
