"""Fusing the op in front of each quantized activation into its transform kernel (real backend).

* RMSNorm: the norm in front of q/k/v (and the one in front of gate/up) only feeds
  quantized linears that share one online transform. Those linears can quantize the raw
  residual stream x instead: the transform kernel multiplies x by the norm weight, sums x²
  on the way and divides each token's scale by rms(x) (see `kernels.norm`). The norm
  module is replaced by a `DeferredRMSNorm` that passes x through unchanged.
* SwiGLU: down_proj's input silu(gate)·up is formed inside its transform kernel from the
  two projections (`FusedSwiGLU` replaces the MLP's forward).
Either way the fused op's own kernels, and their passes over the activation, leave the layer.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.norm import InputNorm, rms_norm_ref
from .adapters import adapter_for


class DeferredRMSNorm(nn.Module):
    """Stands in for an RMSNorm whose consumers normalise inside their transform kernel:
    returns its input unchanged. Keeps the original norm as a child (so `.to()` moves its
    weight) and gives it back on `unfuse_norms`."""

    def __init__(self, norm: nn.Module, eps: float, consumers: list[str]) -> None:
        super().__init__()
        self.norm = norm
        self.eps = eps
        self.consumers = consumers

    def spec(self) -> InputNorm:
        return InputNorm(self.norm.weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"eps={self.eps}, fused into {', '.join(self.consumers)}"


def rms_norm_eps(norm: nn.Module) -> float | None:
    """The eps of an RMSNorm that computes exactly `rms_norm_ref` (checked on a probe), else None."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    probe = torch.randn(3, weight.numel(), generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        same = torch.allclose(norm(probe), rms_norm_ref(probe, InputNorm(weight, float(eps))), rtol=1e-3, atol=1e-3)
    return float(eps) if same else None


def fuse_norms(model: nn.Module) -> list[str]:
    """Fuse every norm whose consumers are all `RealQuantLinear`s of one transform (in place).
    Returns the names of the fused norms."""
    from .real_linear import RealQuantLinear

    adapter = adapter_for(model)
    fused = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for group in adapter.groups:
            if group.producer_kind != "norm":
                continue
            norm = layer.get_submodule(group.producer)
            consumers = [layer.get_submodule(name) for name in group.linears]
            if isinstance(norm, DeferredRMSNorm) or not all(isinstance(c, RealQuantLinear) for c in consumers):
                continue
            if len({c.transform_id for c in consumers}) != 1:
                continue
            eps = rms_norm_eps(norm)
            if eps is None:
                continue
            deferred = DeferredRMSNorm(norm, eps, list(group.linears))
            layer.set_submodule(group.producer, deferred)
            for consumer in consumers:
                consumer.__dict__["input_norm"] = deferred  # unregistered: the layer owns it
            fused.append(f"{adapter.layers}.{index}.{group.producer}")
    return fused


class FusedSwiGLU(nn.Module):
    """Stands in for a LLaMA MLP whose down_proj (a RealQuantLinear) forms silu(gate)·up
    inside its transform kernel. Keeps the MLP as a child; `unfuse` gives it back."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        return m.down_proj.forward_gated(m.gate_proj(x), m.up_proj(x))


def _is_silu(act: nn.Module | None) -> bool:
    if act is None:
        return False
    probe = torch.linspace(-8, 8, 33)
    with torch.no_grad():
        return bool(torch.allclose(act(probe), torch.nn.functional.silu(probe), atol=1e-6))


def fuse_swiglu(model: nn.Module) -> list[str]:
    """Fuse silu(gate)·up into every down_proj that runs on the real backend (in place).
    Returns the names of the fused MLPs."""
    from .real_linear import RealQuantLinear

    adapter = adapter_for(model)
    fused = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or isinstance(mlp, FusedSwiGLU) or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj")):
            continue
        if not isinstance(getattr(mlp, "down_proj", None), RealQuantLinear) or not _is_silu(getattr(mlp, "act_fn", None)):
            continue
        layer.mlp = FusedSwiGLU(mlp)
        fused.append(f"{adapter.layers}.{index}.mlp")
    return fused


def unfuse(model: nn.Module) -> int:
    """Put every original norm and MLP back (and detach the norms from their consumers).
    Returns how many modules were restored."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DeferredRMSNorm):
                setattr(parent, name, child.norm)
                count += 1
            elif isinstance(child, FusedSwiGLU):
                setattr(parent, name, child.mlp)
                count += 1
    for module in model.modules():
        module.__dict__.pop("input_norm", None)
    return count
