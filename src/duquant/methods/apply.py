"""Fusing fitted transforms into a decoder layer and swapping its linears for QuantLinear.

Two phases, so that folding order never matters:
1. smoothing: every group's s is folded into its producer (norm scale, or output rows of
   v_proj / up_proj) and into its linears' input columns, on float64 copies of the weights;
2. transform + rounding: each weight becomes W·G (float64), is rounded to integer codes
   (RTN or GPTQ) and stored in a QuantLinear that applies G and the activation quantizer online.
Both phases run where the layer is (the GPU during `quantize`): on the CPU, the float64
folds and rounding of one LLaMA-2-7B layer take ~15 s, which would dominate a 32-layer run.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..config import QuantConfig
from ..modeling.adapters import AttentionShape, DecoderAdapter, LinearGroup
from ..modeling.attention import AttentionQuantizer
from ..modeling.qlinear import QuantLinear, share_sibling_inputs
from ..quant.quantizer import QuantSpec, compute_qparams, quantize
from ..transforms.online import OnlineTransform
from .plan import GroupTransform

# (transformed weight [out, in] float64, spec, linear name) -> (codes, scale, zero)
WeightRounder = Callable[[torch.Tensor, QuantSpec, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def round_to_nearest(weight: torch.Tensor, spec: QuantSpec, _name: str = ""):
    scale, zero = compute_qparams(weight, spec)
    return quantize(weight, scale, zero, spec), scale, zero


def producer_rows(s: torch.Tensor, rows: int, shape: AttentionShape) -> torch.Tensor:
    """The smoothing scale seen by the producer's output rows.

    Under GQA the o_proj input is [kv_heads, groups, head_dim] while v_proj has
    [kv_heads, head_dim] output rows; s is tied across groups, so take one copy.
    """
    if s.numel() == rows:
        return s
    return s.reshape(shape.num_kv_heads, shape.groups, shape.head_dim)[:, 0, :].reshape(-1)


def fold_smoothing(layer: nn.Module, adapter: DecoderAdapter, plans: dict[str, GroupTransform],
                   weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor | None],
                   shape: AttentionShape) -> None:
    """Phase 1, in place on the float64 `weights`/`biases` and on the norm modules."""
    for group in adapter.groups:
        s = plans[group.name].smooth
        if s is None:
            continue
        for name in group.linears:
            weights[name] = weights[name] * s
        if group.producer_kind == "norm":
            norm = layer.get_submodule(group.producer)
            norm.weight.data = (norm.weight.double() / s.to(norm.weight.device)).to(norm.weight.dtype)
            continue
        s_rows = producer_rows(s, weights[group.producer].shape[0], shape)
        weights[group.producer] = weights[group.producer] / s_rows.unsqueeze(1)
        if biases[group.producer] is not None:
            biases[group.producer] = biases[group.producer] / s_rows


def quantize_layer_linears(layer: nn.Module, adapter: DecoderAdapter, plans: dict[str, GroupTransform],
                           config: QuantConfig, shape: AttentionShape,
                           rounder: WeightRounder = round_to_nearest, prefix: str = "",
                           before_group: Callable[[LinearGroup], None] | None = None) -> None:
    """Fold `plans` into `layer` and replace each of its linears by a QuantLinear.

    before_group(group), if given, is called before a group is rounded, when the norms are
    already smoothed and the earlier groups already swapped: GPTQ records its Hessian there.
    """
    names = adapter.linear_names()
    originals = {name: layer.get_submodule(name) for name in names}
    device = _float64_device(next(iter(originals.values())).weight.device)
    weights = {name: lin.weight.detach().to(device, torch.float64) for name, lin in originals.items()}
    biases = {name: None if lin.bias is None else lin.bias.detach().to(device, torch.float64)
              for name, lin in originals.items()}
    plans = {k: _on(v, device) for k, v in plans.items()}
    fold_smoothing(layer, adapter, plans, weights, biases, shape)

    weight_spec, act_spec = config.weight_spec(), config.act_spec()
    for group in adapter.groups:
        plan = plans[group.name]
        if before_group is not None:
            before_group(group)
        for name in group.linears:
            original = originals[name]
            transform = None
            if plan.has_online:
                transform = OnlineTransform(original.in_features, plan.rot1, plan.perm, plan.rot2, plan.hadamard)
            weight = weights[name] if transform is None else transform.fold_into_weight(weights[name])
            qlinear = QuantLinear(original.in_features, original.out_features, original.bias is not None,
                                  weight_spec, act_spec, transform, dtype=original.weight.dtype).to(device)
            if weight_spec is None:
                qlinear.set_weight(weight=weight)
            else:
                codes, scale, zero = rounder(weight, weight_spec, prefix + name)
                qlinear.set_weight(codes=codes, scale=scale, zero=zero)
            if biases[name] is not None:
                qlinear.bias.data.copy_(biases[name].to(qlinear.bias.dtype))
            layer.set_submodule(name, qlinear.to(original.weight.device))
    share_sibling_inputs(layer)


def install_attention_quantizer(layer: nn.Module, adapter: DecoderAdapter, config: QuantConfig) -> None:
    # DuQuant and QuaRot rotate Q and K by a Hadamard before quantizing them; RTN and
    # SmoothQuant quantize them as they are.
    hadamard = config.method in ("duquant", "quarot")
    quantizer = AttentionQuantizer(config.q_spec(), config.k_spec(), config.v_spec(), qk_hadamard=hadamard)
    layer.get_submodule(adapter.attention).qkv_quantizer = quantizer


def _float64_device(device: torch.device) -> torch.device:
    """Where the float64 folding runs: the layer's device, unless it has no float64 (MPS)."""
    return device if device.type in ("cpu", "cuda") else torch.device("cpu")


def _on(plan: GroupTransform, device: torch.device) -> GroupTransform:
    def move(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        return None if t is None else t.to(device, dtype or t.dtype)

    return GroupTransform(smooth=move(plan.smooth, torch.float64), rot1=move(plan.rot1), perm=move(plan.perm),
                          rot2=move(plan.rot2), hadamard=plan.hadamard)
