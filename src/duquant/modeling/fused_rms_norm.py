"""transformers' RMSNorm modules of one model through the one-kernel RMSNorm
(`kernels.triton_rms_norm`), the way `fused_rope` does it for RoPE: each norm module gets an
instance-level `forward` that runs the kernel where it applies (CUDA, or the Triton
interpreter with DUQUANT_TRITON_INTERPRET=1; no autograd) and the class's forward
everywhere else. Only norms that compute exactly `kernels.norm.rms_norm_ref` (checked on a
probe, as the real backend's norm fusion checks them) are changed; `unfuse_rms_norms`
removes the instance forwards again.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..kernels import ops
from .fusion import rms_norm_eps


def _kernel_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from ..kernels.triton_rms_norm import rms_norm, supported

    weight = self.weight
    differentiable = torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad)
    if not differentiable and ops.use_triton(hidden_states) and supported(hidden_states, weight):
        return rms_norm(hidden_states, weight, self.__dict__["_kernel_eps"])
    return type(self).forward(self, hidden_states)


def is_fused(module: nn.Module) -> bool:
    return getattr(vars(module).get("forward"), "__func__", None) is _kernel_forward


def fuse_rms_norms(model: nn.Module) -> list[str]:
    """Route every RMSNorm of `model` that matches transformers' LLaMA norm through the
    kernel. Returns the names of the modules changed."""
    names = []
    for name, module in model.named_modules():
        if "forward" in vars(module) or "RMSNorm" not in type(module).__name__:
            continue  # already rebound (by us or by someone else), or not a norm
        eps = rms_norm_eps(module)
        if eps is None:
            continue
        module.__dict__["_kernel_eps"] = eps
        module.forward = types.MethodType(_kernel_forward, module)
        names.append(name)
    return names


def unfuse_rms_norms(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Undo `fuse_rms_norms` (for `names` only, if given): the modules run their class's
    forward again."""
    fused = [name for name, module in model.named_modules() if is_fused(module)]
    names = fused if names is None else [name for name in names if name in fused]
    for name in names:
        module = model.get_submodule(name)
        del module.forward
        del module.__dict__["_kernel_eps"]
    return names
