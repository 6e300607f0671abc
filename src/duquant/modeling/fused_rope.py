"""The rotary embedding of an attention module in one kernel (`kernels.triton_rope`).

transformers' attention modules (LLaMA, Mistral, Qwen2, ...) call the module-level function
`apply_rotary_pos_emb` of their modeling file. `fuse_rotary` gives each such module of one
model its own copy of its class's `forward`: the same code, whose `apply_rotary_pos_emb`
resolves to `FusedRotary`, which runs the Triton kernel where it applies (CUDA, or the Triton
interpreter with DUQUANT_TRITON_INTERPRET=1; q/k [B, H, S, D] with a power-of-two D) and the
module's own function everywhere else (also wherever autograd needs the op: the kernel has no
backward). Nothing global changes: other models of the same
class, in the same process, keep transformers' op (the benchmark measures BF16 both ways).
`unfuse_rotary` removes the copies.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from ..kernels import ops

_NAME = "apply_rotary_pos_emb"


class FusedRotary:
    """Drop-in for transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)."""

    def __init__(self, original) -> None:
        self.original = original

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        from ..kernels.triton_rope import rotary_embedding, supported

        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if len(args) == 1 else 1)
        standard = len(args) + len(kwargs) <= 1 and set(kwargs) <= {"unsqueeze_dim"} and unsqueeze_dim == 1
        # the kernel has no backward: anything autograd must follow keeps transformers' op
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin))
        if standard and not differentiable and ops.use_triton(q) and supported(q, k, cos, sin):
            return rotary_embedding(q, k, cos, sin)
        return self.original(q, k, cos, sin, *args, **kwargs)


_COPIES: dict[types.FunctionType, types.FunctionType] = {}  # class forward -> its copy (one per class)


def _fused_forward(module: nn.Module) -> types.FunctionType | None:
    """A copy of module's class forward whose apply_rotary_pos_emb is a FusedRotary, or None
    when the forward does not call that module-level function."""
    forward = type(module).forward
    code = getattr(forward, "__code__", None)
    if code is None or _NAME not in code.co_names or _NAME not in forward.__globals__:
        return None
    if forward not in _COPIES:
        scope = dict(forward.__globals__)  # the modeling file's names, one of them replaced
        scope[_NAME] = FusedRotary(forward.__globals__[_NAME])
        fn = types.FunctionType(code, scope, forward.__name__, forward.__defaults__, forward.__closure__)
        fn.__kwdefaults__ = forward.__kwdefaults__
        fn.__qualname__ = forward.__qualname__
        _COPIES[forward] = fn
    return _COPIES[forward]


def fuse_rotary(model: nn.Module) -> list[str]:
    """Give every attention module of `model` that applies RoPE through the module-level
    function the one-kernel version. Returns the names of the modules changed."""
    names = []
    for name, module in model.named_modules():
        if "forward" in vars(module):  # already fused (or otherwise rebound): leave it
            continue
        fn = _fused_forward(module)
        if fn is not None:
            module.forward = types.MethodType(fn, module)
            names.append(name)
    return names


def is_fused(module: nn.Module) -> bool:
    fn = getattr(vars(module).get("forward"), "__func__", None)
    return isinstance(fn, types.FunctionType) and isinstance(fn.__globals__.get(_NAME), FusedRotary)


def unfuse_rotary(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Undo `fuse_rotary` (for `names` only, if given): the modules run their class's
    forward again."""
    fused = [name for name, module in model.named_modules() if is_fused(module)]
    names = fused if names is None else [name for name in names if name in fused]
    for name in names:
        del model.get_submodule(name).forward
    return names
