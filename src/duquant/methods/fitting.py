"""Fitting the per-group transforms of RTN, SmoothQuant and DuQuant."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import QuantConfig
from ..modeling.adapters import AttentionShape, LinearGroup
from ..transforms.permutation import zigzag_permutation
from ..transforms.rotation import auto_block_size, greedy_rotations, rotate_blocks, worst_block
from ..transforms.smoothing import smoothing_scales, weight_input_absmax
from .plan import GroupTransform

log = logging.getLogger(__name__)
_logged_block_sizes: set[tuple[int, int]] = set()


def kv_tied(values: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """Max over the query heads that share a KV head, broadcast back (o_proj input under GQA).

    The o_proj input is laid out [kv_heads, groups, head_dim]; a smoothing scale folded into
    v_proj's output rows can only differ per KV head, so it is tied across each group.
    """
    v = values.reshape(shape.num_kv_heads, shape.groups, shape.head_dim).amax(dim=1, keepdim=True)
    return v.expand(-1, shape.groups, -1).reshape(-1)


def fit_smoothing(group: LinearGroup, layer: nn.Module, act_absmax: torch.Tensor, config: QuantConfig,
                  shape: AttentionShape) -> torch.Tensor:
    weights = [layer.get_submodule(name).weight for name in group.linears]
    w_absmax = weight_input_absmax(weights, config.smooth_weight_stat)
    act = act_absmax.double().cpu()
    if group.producer_kind == "linear" and layer.get_submodule(group.producer).out_features != act.numel():
        act, w_absmax = kv_tied(act, shape), kv_tied(w_absmax.cpu(), shape)
    return smoothing_scales(act, w_absmax.cpu(), config.alpha)


def block_size_for(channels: int, config: QuantConfig, where: str) -> int:
    if config.block_size is not None:
        if channels % config.block_size:
            raise ValueError(
                f"block size {config.block_size} does not divide the {channels} input channels of {where}; "
                f"use a power of two that divides {channels} (e.g. {auto_block_size(channels)}) or leave it unset"
            )
        return config.block_size
    size = auto_block_size(channels)
    if size != 128 and (channels, size) not in _logged_block_sizes:
        _logged_block_sizes.add((channels, size))
        log.info("block size 128 does not divide %d channels; using block size %d there", channels, size)
    return size


def _fit_rotation_batch(xs: list[torch.Tensor], block_sizes: list[int], config: QuantConfig,
                        generators: list[torch.Generator]) -> list[torch.Tensor]:
    """One shared block rotation per activation xs[i] [tokens, C_i] (float64 on the CPU).

    Each is fitted on its block with the largest |x| (Remark 2). Blocks of the same shape
    run as one batched greedy loop; every block keeps its own generator, so the result is
    the same as fitting them one at a time."""
    blocks = [worst_block(x, n) for x, n in zip(xs, block_sizes)]
    out: list[torch.Tensor | None] = [None] * len(xs)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, block in enumerate(blocks):
        by_shape.setdefault(tuple(block.shape), []).append(i)
    for members in by_shape.values():
        rots = greedy_rotations(torch.stack([blocks[i] for i in members]), config.rotation_steps,
                                [generators[i] for i in members], config.exchange, config.prefix_criterion)
        for i, rot in zip(members, rots.cpu()):
            out[i] = rot
    return out


def fit_rotations(xs: list[torch.Tensor], config: QuantConfig, block_sizes: list[int],
                  generators: list[torch.Generator]) -> list[GroupTransform]:
    """R̂₁ → zigzag P → R̂₂ for each (smoothed) mean activation xs[i] [tokens, C_i]."""
    plans = [GroupTransform() for _ in xs]
    if config.rotations >= 1:
        for i, rot in enumerate(_fit_rotation_batch(xs, block_sizes, config, generators)):
            plans[i].rot1 = rot
            xs[i] = rotate_blocks(xs[i].double(), rot.to(xs[i].device))
    if config.permute:
        for i, (x, n) in enumerate(zip(xs, block_sizes)):
            plans[i].perm = zigzag_permutation(x.abs().amax(dim=0).cpu(), n)
            xs[i] = x[:, plans[i].perm.to(x.device)]
    if config.rotations >= 2:
        for i, rot in enumerate(_fit_rotation_batch(xs, block_sizes, config, generators)):
            plans[i].rot2 = rot
    return plans


def fit_groups(groups: list[LinearGroup], layer: nn.Module, config: QuantConfig, shape: AttentionShape,
               absmax: dict[str, torch.Tensor] | None, mean_sequence: dict[str, torch.Tensor] | None,
               generators: list[torch.Generator], where: str) -> dict[str, GroupTransform]:
    """The transforms of all groups of one decoder layer for rtn / smoothquant / duquant
    (their rotations fitted together: see `_fit_rotation_batch`)."""
    plans: dict[str, GroupTransform] = {}
    rotated: list[tuple[LinearGroup, torch.Tensor | None, torch.Tensor, torch.Generator]] = []
    for group, generator in zip(groups, generators):
        smooth = fit_smoothing(group, layer, absmax[group.name], config, shape) if config.uses_smoothing else None
        if config.method != "duquant" or (config.rotations == 0 and not config.permute):
            plans[group.name] = GroupTransform(smooth=smooth)
            continue
        x = mean_sequence[group.name].double()
        rotated.append((group, smooth, x if smooth is None else x / smooth.to(x.device), generator))
    if rotated:
        xs = [x for _, _, x, _ in rotated]
        sizes = [block_size_for(x.shape[-1], config, f"{where} {g.name}") for g, _, x, _ in rotated]
        fitted = fit_rotations(xs, config, sizes, [gen for *_, gen in rotated])
        for (group, smooth, _, _), plan in zip(rotated, fitted):
            plan.smooth = smooth
            plans[group.name] = plan
    return {group.name: plans[group.name] for group in groups}
