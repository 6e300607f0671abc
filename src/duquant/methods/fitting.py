"""Fitting the per-group transforms of RTN, SmoothQuant and DuQuant."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import QuantConfig
from ..modeling.adapters import AttentionShape, LinearGroup
from ..transforms.permutation import zigzag_permutation
from ..transforms.rotation import auto_block_size, fit_block_rotation, rotate_blocks
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


def fit_rotations(mean_sequence: torch.Tensor, config: QuantConfig, block_size: int,
                  generator: torch.Generator) -> GroupTransform:
    """R̂₁ → zigzag P → R̂₂ on the (smoothed) mean activation [tokens, C]."""
    x = mean_sequence
    plan = GroupTransform()
    if config.rotations >= 1:
        plan.rot1 = fit_block_rotation(x, block_size, config.rotation_steps, generator, config.exchange,
                                       config.prefix_criterion).cpu()
        x = rotate_blocks(x.double(), plan.rot1.to(x.device))
    if config.permute:
        plan.perm = zigzag_permutation(x.abs().amax(dim=0).cpu(), block_size)
        x = x[:, plan.perm.to(x.device)]
    if config.rotations >= 2:
        plan.rot2 = fit_block_rotation(x, block_size, config.rotation_steps, generator, config.exchange,
                                       config.prefix_criterion).cpu()
    return plan


def fit_group(group: LinearGroup, layer: nn.Module, config: QuantConfig, shape: AttentionShape,
              absmax: torch.Tensor | None, mean_sequence: torch.Tensor | None, generator: torch.Generator,
              where: str) -> GroupTransform:
    """The transform of one group for rtn / smoothquant / duquant."""
    smooth = fit_smoothing(group, layer, absmax, config, shape) if config.uses_smoothing else None
    if config.method != "duquant" or (config.rotations == 0 and not config.permute):
        return GroupTransform(smooth=smooth)
    x = mean_sequence.double()
    if smooth is not None:
        x = x / smooth.to(x.device)
    plan = fit_rotations(x, config, block_size_for(x.shape[-1], config, where), generator)
    plan.smooth = smooth
    return plan
