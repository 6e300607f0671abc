"""A one-entry memo of the quantized input that sibling linears share.

q/k/v (and gate/up) read one activation through one online transform and one activation
quantizer: the first of them computes the quantized input and its siblings reuse it, so a
LLaMA layer runs 4 transforms instead of 7 (in the simulated forward of calibration and
evaluation, and in the real backend's kernels).

The entry is keyed on the input tensor's identity, its version counter (an in-place change
invalidates it) and the caller's share key (which linears may reuse each other's work). It
holds the input only through a weak reference: the memo never keeps an activation alive,
drops its value when the input dies, and a later tensor that reuses the input's memory is a
different object, so it never hits.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator

import torch
from torch import nn


class InputMemo:
    def __init__(self) -> None:
        self._entry: tuple[weakref.ref, tuple, object] | None = None

    def lookup(self, x: torch.Tensor, key: Hashable, compute: Callable[[], object]) -> object:
        """compute() for input x, or the value computed for this very x under the same key."""
        entry, full_key = self._entry, (key, x._version)
        if entry is not None and entry[0]() is x and entry[1] == full_key:
            return entry[2]
        value = compute()
        self._entry = (weakref.ref(x, self._forget), full_key, value)
        return value

    def _forget(self, ref: weakref.ref) -> None:
        if self._entry is not None and self._entry[0] is ref:
            self._entry = None

    def clear(self) -> None:
        self._entry = None


def siblings_with_twin(model: nn.Module, kind: type, same: Callable[[nn.Module, nn.Module], bool]
                       ) -> Iterator[tuple[nn.Module, nn.Module | None]]:
    """Every module of `kind`, with the first earlier sibling (child of the same parent, in
    order) for which same(module, sibling) holds, or None. Siblings are where one activation
    feeds several linears (q/k/v, gate/up)."""
    for parent in model.modules():
        seen: list[nn.Module] = []
        for child in parent.children():
            if isinstance(child, kind):
                yield child, next((other for other in seen if same(child, other)), None)
                seen.append(child)
