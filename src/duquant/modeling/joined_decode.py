"""Sibling linears at decode as one GEMV: q/k/v, and gate/up.

At decode a W4A4 linear is one short GEMV over the packed weight, and on an H100 the
4096×4096 one is launch-bound (7 µs against a 2.8 µs bytes floor; results/kernels/NOTES.md).
Siblings that read one activation through one transform (they share `transform_id`) already
share its quantized codes (`RealQuantLinear`'s input memo); a `JoinedDecode` also runs their
GEMVs as one launch over the stacked rows (`ops.w4a4_linear_joined`: the dp4a GEMV up to
ops.DECODE_GEMV_MAX_M tokens, the int8-MMA decode kernel up to ops.DECODE_MAX_M) and hands
each sibling its block of columns. The weights stay separate tensors (nothing is copied, so the model's
memory is unchanged); only their per-channel scale, zero point and bias are concatenated.

The first sibling called computes the whole output; the others find it in a one-entry memo
keyed on the input (the same rules as `InputMemo`: identity and version, weak reference).
Larger M (prefill) keeps one GEMM per linear.
"""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import ops
from .input_memo import InputMemo, siblings_with_twin

# Most weights one GEMV launch takes (the kernel's limit).
MAX_JOINED = 3


class JoinedDecode:
    def __init__(self, members: list[nn.Module]) -> None:
        if not 2 <= len(members) <= MAX_JOINED:
            raise ValueError(f"a joined decode GEMV takes 2 to {MAX_JOINED} linears, got {len(members)}")
        self.members = members
        self.memo = InputMemo()
        self._vectors: tuple[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None

    def columns(self, member: nn.Module) -> tuple[int, int]:
        """[start, stop) of `member`'s outputs in the stacked output."""
        start = 0
        for m in self.members:
            if m is member:
                return start, start + m.out_features
            start += m.out_features
        raise ValueError("not a member of this joined GEMV")

    def applies(self, x: torch.Tensor) -> bool:
        """A decode call on the kernels (few tokens). Whether the weights' layout suits the one
        launch is `ops.w4a4_linear_joined`'s to decide: otherwise it runs them one by one."""
        return x.numel() <= ops.DECODE_MAX_M * x.shape[-1] and ops.use_triton(x)

    def _stacked_vectors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Concatenated scale, zero point and bias (None when no member has one), rebuilt when a
        member's tensors change (a move to another device, a reload)."""
        tensors = [t for m in self.members for t in (m.w_scale, m.w_zero, m.bias) if t is not None]
        key = tuple((t.data_ptr(), t.device, t._version) for t in tensors)
        if self._vectors is None or self._vectors[0] != key:
            scale = torch.cat([m.w_scale for m in self.members])
            zero = torch.cat([m.w_zero for m in self.members])
            bias = None
            if any(m.bias is not None for m in self.members):
                bias = torch.cat([m.bias.to(torch.float32) if m.bias is not None
                                  else torch.zeros(m.out_features, device=scale.device) for m in self.members])
            self._vectors = (key, (scale, zero, bias))
        return self._vectors[1]

    def forward(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`member`'s output for input x: its columns of the joined GEMV's output."""
        def run() -> torch.Tensor:
            scale, zero, bias = self._stacked_vectors()
            weights = [m.packed_weight() for m in self.members]
            y = member._fused_decode(x, weights, scale, zero, bias)  # the transform inside the GEMV
            if y is None:
                a, s = member._quantize_input(x)
                y = ops.w4a4_linear_joined(a, s, weights, scale, zero, bias, x.dtype)
            return y

        y = self.memo.lookup(x, member._transform_key(), run)
        start, stop = self.columns(member)
        return y[..., start:stop]


def join_sibling_decodes(model: nn.Module) -> int:
    """Give every run of sibling `RealQuantLinear`s with one transform (q/k/v, gate/up) a
    `JoinedDecode` (unregistered, like the fused norm). Returns how many linears were joined."""
    from .real_linear import RealQuantLinear

    # siblings with one transform, in order, under the first of them
    runs: dict[int, list[RealQuantLinear]] = {}
    for child, twin in siblings_with_twin(model, RealQuantLinear, lambda a, b: a.transform_id == b.transform_id):
        if not child.group_size:
            runs.setdefault(id(twin if twin is not None else child), []).append(child)
    joined = 0
    for members in runs.values():
        for i in range(0, len(members), MAX_JOINED):
            chunk = members[i:i + MAX_JOINED]
            if len(chunk) < 2 or len({m.in_features for m in chunk}) != 1:
                continue
            group = JoinedDecode(chunk)
            for member in chunk:
                member.__dict__["joined_decode"] = group
            joined += len(chunk)
    return joined
