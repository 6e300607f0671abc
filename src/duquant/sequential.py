"""The layer-by-layer runner shared by every calibration-based method.

Only one decoder layer sits on the accelerator at a time. The calibration windows are
embedded once, captured at the input of layer 0 together with the keyword arguments the
model passes to every layer (RoPE cos/sin, mask, positions), and then pushed through the
layers one by one. Hidden states live on the accelerator when they fit (`offload=False`) and
on the CPU otherwise.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (its result is not needed)."""


@dataclass
class LayerInputs:
    """Hidden states of the calibration set at one depth, in batches, plus the layer kwargs."""

    batches: list[torch.Tensor]
    layer_kwargs: dict = field(default_factory=dict)
    storage_device: torch.device = torch.device("cpu")

    def clone(self) -> "LayerInputs":
        return LayerInputs([b.clone() for b in self.batches], self.layer_kwargs, self.storage_device)


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    return value


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, adapter, tokens: torch.Tensor, device: torch.device,
                          batch_size: int, offload: bool) -> LayerInputs:
    """Embed `tokens` [n, seqlen] and capture what decoder layer 0 receives."""
    layers = adapter.decoder_layers(model)
    embed = model.get_submodule(adapter.embed_tokens)
    rotary = model.get_submodule(adapter.rotary_emb)
    embed_device = embed.weight.device
    embed.to(device), rotary.to(device)
    captured: dict = {}

    def hook(_module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopForward

    storage = torch.device("cpu") if offload else device
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    batches = []
    try:
        for start in range(0, len(tokens), batch_size):
            try:
                model.model(input_ids=tokens[start : start + batch_size].to(device), use_cache=False)
            except StopForward:
                pass
            batches.append(captured["hidden"].to(storage))
    finally:
        handle.remove()
        embed.to(embed_device), rotary.to(embed_device)
    kwargs = captured["kwargs"]
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    return LayerInputs(batches, kwargs, storage)


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> LayerInputs:
    """Outputs of `layer` (already on `device`) for every batch of `inputs`."""
    kwargs = {k: _move(v, device) for k, v in inputs.layer_kwargs.items()}
    outputs = []
    for hidden in inputs.batches:
        out = layer(hidden.to(device), **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        outputs.append(out.to(inputs.storage_device))
    return LayerInputs(outputs, inputs.layer_kwargs, inputs.storage_device)


@torch.no_grad()
def try_each_batch(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> None:
    """Run `layer` on every batch of `inputs` for its hooks' sake, until each raises StopForward."""
    kwargs = {k: _move(v, device) for k, v in inputs.layer_kwargs.items()}
    for hidden in inputs.batches:
        try:
            layer(hidden.to(device), **kwargs)
        except StopForward:
            continue
        raise RuntimeError("the layer finished without reaching the hook that should have stopped it")


@contextmanager
def input_hooks(modules: dict[str, nn.Module], fn):
    """Call fn(name, x) with the input of each named module while the context is open."""
    handles = [m.register_forward_pre_hook(lambda _m, args, name=name: fn(name, args[0])) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_finite(inputs: LayerInputs, layer_index: int, what: str = "output") -> None:
    for hidden in inputs.batches:
        if not torch.isfinite(hidden).all():
            raise FloatingPointError(
                f"decoder layer {layer_index} produced NaN or inf in its {what} during calibration; "
                "try float32 (--dtype float32), fewer bits, or another calibration set"
            )
