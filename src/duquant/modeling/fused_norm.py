"""Fusing a decoder layer's RMSNorms into the transform kernels of the real backend.

In the real backend, the norm in front of q/k/v (and the one in front of gate/up) only
feeds quantized linears that share one online transform. Those linears can quantize the
raw residual stream x instead: the transform kernel multiplies x by the norm weight,
sums x² on the way and divides each token's scale by rms(x) (see `kernels.norm`). The
norm module is then replaced by a `DeferredRMSNorm` that passes x through unchanged, and
the norm's own kernels (and their passes over the activation) leave the layer.
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


def _rms_eps(norm: nn.Module) -> float | None:
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
            eps = _rms_eps(norm)
            if eps is None:
                continue
            deferred = DeferredRMSNorm(norm, eps, list(group.linears))
            layer.set_submodule(group.producer, deferred)
            for consumer in consumers:
                consumer.__dict__["input_norm"] = deferred  # unregistered: the layer owns it
            fused.append(f"{adapter.layers}.{index}.{group.producer}")
    return fused


def unfuse_norms(model: nn.Module) -> int:
    """Put every original norm back (and detach it from its consumers). Returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DeferredRMSNorm):
                setattr(parent, name, child.norm)
                count += 1
    for module in model.modules():
        module.__dict__.pop("input_norm", None)
    return count
