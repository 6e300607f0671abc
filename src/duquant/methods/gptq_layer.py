"""GPTQ inside the layer-by-layer pipeline, after any method's transforms.

Within one decoder layer the linear groups are quantized in order (q/k/v, then o_proj, then
gate/up, then down_proj). Just before a group is rounded, the layer's calibration inputs
(the output of the already-quantized layers before it) are pushed through the layer as it is
at that moment: smoothing folded into the norms and producers, the earlier groups already
QuantLinears (quantized weights and activations), Q/K/V quantized. The forward stops at the
group's first linear and its input X is accumulated into XᵀX. So o_proj's Hessian sees the
quantized q/k/v, down_proj's the quantized gate/up, as in sequential GPTQ.

The linear itself reads X·G, G its online transform (DuQuant's R̂₁·P·R̂₂, QuaRot's Hadamard),
and its stored weight is W·G, so its Hessian is Gᵀ·(XᵀX)·G, computed in float64. X is taken
before the linear's own activation quantizer, as GPTQ and QuaRot do.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import FULL_PRECISION_BITS, QuantConfig
from ..modeling.adapters import LinearGroup
from ..quant.gptq import HessianAccumulator, gptq_quantize
from ..quant.quantizer import QuantSpec
from ..sequential import LayerInputs, StopForward, try_each_batch
from ..transforms.online import OnlineTransform
from .apply import WeightRounder, install_attention_quantizer, quantize_layer_linears, round_to_nearest
from .plan import GroupTransform


@torch.no_grad()
def input_hessian(layer: nn.Module, linear: nn.Module, inputs: LayerInputs, device: torch.device) -> torch.Tensor:
    """2/N·XᵀX of the input of `linear` when `layer` runs on `inputs` (stops the forward there)."""
    accumulator = HessianAccumulator(linear.in_features, device)

    def hook(_module, args):
        accumulator.add_batch(args[0])
        raise StopForward  # the rest of the layer is not needed

    handle = linear.register_forward_pre_hook(hook)
    try:
        try_each_batch(layer, inputs, device)
    finally:
        handle.remove()
    if accumulator.nsamples == 0:
        raise RuntimeError("GPTQ: the calibration forward never reached the linear layer")
    return accumulator.hessian


def transformed_hessian(hessian: torch.Tensor, plan: GroupTransform) -> torch.Tensor:
    """Gᵀ·H·G in float64 (H unchanged without an online transform)."""
    h = hessian.detach().double().cpu()
    if not plan.has_online:
        return h
    # The same G that quantize_layer_linears builds and folds into the weight.
    g = OnlineTransform(h.shape[0], plan.rot1, plan.perm, plan.rot2, plan.hadamard)
    return g.fold_into_weight(g.fold_into_weight(h).T)  # (H·G)ᵀ·G = Gᵀ·H·G (H symmetric)


class LayerGPTQ:
    """The `before_group` callback and the weight rounder of one decoder layer."""

    def __init__(self, layer: nn.Module, inputs: LayerInputs, device: torch.device,
                 plans: dict[str, GroupTransform], config: QuantConfig, prefix: str) -> None:
        self.layer, self.inputs, self.device = layer, inputs, device
        self.plans, self.config, self.prefix = plans, config, prefix
        self.hessians: dict[str, torch.Tensor] = {}

    def before_group(self, group: LinearGroup) -> None:
        first = self.layer.get_submodule(group.linears[0])
        h = transformed_hessian(input_hessian(self.layer, first, self.inputs, self.device), self.plans[group.name])
        for name in group.linears:  # they all read the same activation
            self.hessians[self.prefix + name] = h

    def round(self, weight: torch.Tensor, spec: QuantSpec, name: str):
        hessian = self.hessians.pop(name)
        codes, scale, zero = gptq_quantize(weight.to(self.device), hessian.to(self.device), spec,
                                           damp=self.config.gptq_damp, act_order=self.config.gptq_act_order)
        return codes.cpu(), scale.cpu(), zero.cpu()


def uses_gptq(config: QuantConfig) -> bool:
    return config.weight_quantizer == "gptq" and config.wbits != FULL_PRECISION_BITS


def weight_rounding(config: QuantConfig, layer: nn.Module, inputs: LayerInputs | None, device: torch.device,
                    plans: dict[str, GroupTransform], prefix: str) -> tuple[WeightRounder, object]:
    """(rounder, before_group) for `quantize_layer_linears`: RTN, or GPTQ on `inputs`."""
    if not uses_gptq(config):
        return round_to_nearest, None
    if inputs is None:
        raise ValueError("GPTQ needs calibration data")
    gptq = LayerGPTQ(layer, inputs, device, plans, config, prefix)
    return gptq.round, gptq.before_group


def quantize_layer(layer: nn.Module, index: int, adapter, plans: dict[str, GroupTransform], config: QuantConfig,
                   shape, inputs: LayerInputs | None, device: torch.device) -> None:
    """Install the attention quantizer, then round and swap in every linear of decoder layer `index`.

    The attention quantizer comes first because GPTQ runs the half-quantized layer on `inputs`.
    """
    install_attention_quantizer(layer, adapter, config)
    prefix = f"{adapter.layers}.{index}."
    rounder, before_group = weight_rounding(config, layer, inputs, device, plans, prefix)
    quantize_layer_linears(layer, adapter, plans, config, shape, rounder, prefix, before_group)
