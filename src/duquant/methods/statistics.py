"""Activation statistics of a decoder layer's linear groups, gathered with forward hooks."""
from __future__ import annotations

import torch
from torch import nn

from ..sequential import LayerInputs, StopForward, input_hooks, run_layer, try_each_batch


class GroupStatistics:
    """Per group: channel abs-max over all tokens and/or the element-wise mean sequence."""

    def __init__(self, want_absmax: bool, want_mean: bool) -> None:
        self.want_absmax, self.want_mean = want_absmax, want_mean
        self.absmax: dict[str, torch.Tensor] = {}
        self.mean_sum: dict[str, torch.Tensor] = {}
        self.mean_count: dict[str, int] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        x = x.detach()
        if self.want_absmax:
            # max(|max|, |min|) is exact in any dtype: one pass over x, no copy of it
            # (x.abs() would write one as large as x)
            lo, hi = torch.aminmax(x.reshape(-1, x.shape[-1]), dim=0)
            amax = torch.maximum(hi.abs(), lo.abs()).float()
            prev = self.absmax.get(name)
            self.absmax[name] = amax if prev is None else torch.maximum(prev, amax)
        if self.want_mean:
            # The DuQuant reference statistic: the calibration samples averaged into one sequence.
            sequences = x.reshape(-1, *x.shape[-2:])
            # summed in float32 inside the reduction, without a float32 copy of x
            total = sequences.sum(dim=0, dtype=torch.float32)
            prev = self.mean_sum.get(name)
            self.mean_sum[name] = total if prev is None else prev + total
            self.mean_count[name] = self.mean_count.get(name, 0) + sequences.shape[0]

    def mean_sequence(self, name: str) -> torch.Tensor:
        return self.mean_sum[name] / self.mean_count[name]


def collect(layer: nn.Module, adapter, inputs: LayerInputs, device: torch.device, want_absmax: bool,
            want_mean: bool, want_outputs: bool = True) -> tuple[GroupStatistics, LayerInputs | None]:
    """Run `layer` on `inputs`, recording the input of each group's first linear; returns its
    outputs too, or, without want_outputs, None: each forward then stops once the last group's
    input is seen (the rest of the layer, e.g. down_proj's GEMM, would only be thrown away)."""
    stats = GroupStatistics(want_absmax, want_mean)
    watched = {group.name: layer.get_submodule(group.linears[0]) for group in adapter.groups}
    if want_outputs:
        with input_hooks(watched, stats.observe):
            return stats, run_layer(layer, inputs, device)
    last = adapter.groups[-1].name

    def observe_then_stop(name: str, x: torch.Tensor) -> None:
        stats.observe(name, x)
        if name == last:
            raise StopForward

    with input_hooks(watched, observe_then_stop):
        try_each_batch(layer, inputs, device)
    return stats, None
