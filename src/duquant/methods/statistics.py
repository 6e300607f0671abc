"""Activation statistics of a decoder layer's linear groups, gathered with forward hooks."""
from __future__ import annotations

import torch
from torch import nn

from ..sequential import LayerInputs, input_hooks, run_layer


class GroupStatistics:
    """Per group: channel abs-max over all tokens and/or the element-wise mean sequence."""

    def __init__(self, want_absmax: bool, want_mean: bool) -> None:
        self.want_absmax, self.want_mean = want_absmax, want_mean
        self.absmax: dict[str, torch.Tensor] = {}
        self.mean_sum: dict[str, torch.Tensor] = {}
        self.mean_count: dict[str, int] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.want_absmax:
            amax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
            prev = self.absmax.get(name)
            self.absmax[name] = amax if prev is None else torch.maximum(prev, amax)
        if self.want_mean:
            # The DuQuant reference statistic: the calibration samples averaged into one sequence.
            total = x.reshape(-1, *x.shape[-2:]).sum(dim=0)
            prev = self.mean_sum.get(name)
            self.mean_sum[name] = total if prev is None else prev + total
            self.mean_count[name] = self.mean_count.get(name, 0) + x.reshape(-1, *x.shape[-2:]).shape[0]

    def mean_sequence(self, name: str) -> torch.Tensor:
        return self.mean_sum[name] / self.mean_count[name]


def collect(layer: nn.Module, adapter, inputs: LayerInputs, device: torch.device, want_absmax: bool,
            want_mean: bool) -> tuple[GroupStatistics, LayerInputs]:
    """Run `layer` on `inputs`, recording the input of each group's first linear; returns outputs too."""
    stats = GroupStatistics(want_absmax, want_mean)
    watched = {group.name: layer.get_submodule(group.linears[0]) for group in adapter.groups}
    with input_hooks(watched, stats.observe):
        outputs = run_layer(layer, inputs, device)
    return stats, outputs
