"""Real W4A4 execution of a quantized model: `RealQuantLinear` and `to_real_backend`.

`QuantLinear` (the simulated mode) computes linear(fake_quant(x·G), dequant(W_q)). The
real mode computes the same function from integers: the online transform x·G and the
per-token asymmetric quantization produce a = q_x − z_x (int8 or e4m3 carriers) and the
per-token scale; the GEMM multiplies a by the packed 4-bit weight codes minus their zero
point and applies s_x·s_w in its epilogue:
    y[t, j] = s_x[t]·s_w[j]·Σ_k a[t, k]·(q_w[j, k] − z_w[j])  (+ bias)
which equals x̂·Ŵᵀ exactly up to float rounding. On CUDA the three stages run through the
Triton kernels of `duquant.kernels.ops`; on CPU through their pure-PyTorch references, so
the real mode also runs (slowly) without a GPU.

Layers the kernels do not cover (16-bit or symmetric activations, weights other than
4-bit, activation groups) keep the simulated forward; `to_real_backend` reports them.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..kernels import ops
from ..kernels.norm import InputNorm
from ..kernels.weight import PackedWeight
from ..transforms.online import same_tensor
from .input_memo import InputMemo, siblings_with_twin
from .qlinear import QuantLinear


def _hadamard_base(k: int, device: torch.device) -> torch.Tensor | None:
    from ..transforms.hadamard import _base_matrix, _decompose

    m, _ = _decompose(k)
    return None if m == 1 else _base_matrix(m).to(device=device, dtype=torch.float32)


def supports_real(layer: QuantLinear) -> bool:
    """Whether the W4A4 kernels can run this layer (else it keeps the simulated forward):
    4-bit weights (a symmetric weight is stored with z = 8, so the kernels see q − z either
    way) and ≤ 4-bit per-token activations, asymmetric (DuQuant) or symmetric (QuaRot)."""
    w, a = layer.weight_spec, layer.act_spec
    return (w is not None and a is not None and w.bits == 4 and a.bits <= 4 and a.group_size == 0
            and layer.in_features % 2 == 0)


_MEMO = InputMemo()


class RealQuantLinear(nn.Module):
    """W4A4 linear layer on integer kernels, built from a `QuantLinear` (shares its buffers).

    prefill_weight: None keeps only the packed 4-bit codes (¼ of BF16; the prefill GEMM
    expands them to an 8-bit carrier on each call), "fp8"/"int8" also keeps an 8-bit copy
    of q − z for the prefill tensor-core GEMM (faster prefill, 3/4 of BF16's weight bytes).
    """

    def __init__(self, layer: QuantLinear, prefill_weight: str | None = None) -> None:
        super().__init__()
        if not supports_real(layer):
            raise ValueError(f"no W4A4 kernel for {layer.extra_repr()}")
        self.in_features, self.out_features = layer.in_features, layer.out_features
        spec = layer.weight_spec
        scale, zero = layer.w_scale, layer.w_zero
        if spec.group_size == 0:
            scale, zero = scale[:, 0], zero[:, 0]
        # Buffers (shared with the QuantLinear, not copied) so that .to(device) moves them;
        # not persistent: checkpoints keep the QuantLinear layout.
        self.register_buffer("qweight", layer.qweight, persistent=False)
        self.register_buffer("w_scale", scale, persistent=False)
        self.register_buffer("w_zero", zero, persistent=False)
        self.group_size = spec.group_size
        self.bias = layer.bias
        self.act_bits, self.act_clip = layer.act_spec.bits, layer.act_spec.clip
        self.act_symmetric = layer.act_spec.symmetric
        t = layer.input_transform
        for name in ("rot1", "perm", "rot2"):
            self.register_buffer(name, None if t is None else getattr(t, name), persistent=False)
        self.hadamard = bool(t is not None and t.hadamard)
        self._transform = t  # for the rare DuQuant + Hadamard combination (factors then Hadamard)
        self.prefill_weight = prefill_weight
        # The simulated layer this one was built from, unregistered (no second copy in
        # state_dict or .to()): `to_simulated_backend` puts it back, e.g. before saving.
        self.__dict__["source"] = layer
        # Layers with the same transform_id apply the same transform (`share_sibling_transforms`).
        self.transform_id = id(self)
        self._w8: torch.Tensor | None = None
        self._had: tuple[torch.device, torch.Tensor | None] | None = None

    def packed_weight(self) -> PackedWeight:
        w = PackedWeight(self.qweight, self.w_scale, self.w_zero, self.in_features, 4, self.group_size)
        if self.prefill_weight is not None and self.qweight.is_cuda and not self.group_size:
            if self._w8 is None or self._w8.device != self.qweight.device:
                dtype = torch.float8_e4m3fn if self.prefill_weight == "fp8" else torch.int8
                self._w8 = w.centered(dtype).contiguous()
            w.w8 = self._w8
        return w

    def _input_norm(self) -> InputNorm | None:
        deferred = self.__dict__.get("input_norm")  # set by modeling.fusion.fuse_norms
        return None if deferred is None else deferred.spec()

    def _transform_key(self) -> tuple:
        return (self.transform_id, id(self.__dict__.get("input_norm")), self.hadamard, self.act_bits, self.act_clip,
                self.act_symmetric)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q/k/v (and gate/up) read the same activation through the same transform: the
        # first of them quantizes it, the others reuse the codes (`InputMemo`).
        return _MEMO.lookup(x, self._transform_key(), lambda: self._quantize_input_uncached(x))

    def _quantize_input_uncached(self, x: torch.Tensor,
                                 up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self._input_norm()
        if self.hadamard:
            if self.rot1 is not None or self.perm is not None or self.rot2 is not None:
                x, norm, up = ops.fused_input_ref(x, norm, up), None, None
                x = self._transform._apply_factors(x.to(torch.float32), torch.float32)
            if self._had is None or self._had[0] != x.device:
                self._had = (x.device, _hadamard_base(self.in_features, x.device))
            return ops.hadamard_quantize(x, self._had[1], self.act_bits, self.act_clip, symmetric=self.act_symmetric,
                                         norm=norm, up=up)
        return ops.transform_quantize(x, self.rot1, self.perm, self.rot2, None, self.act_bits, self.act_clip,
                                      symmetric=self.act_symmetric, norm=norm, up=up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = self.__dict__.get("joined_decode")  # set by modeling.joined_decode
        if joined is not None and joined.applies(x):
            return joined.forward(self, x)
        y = self._fused_decode_alone(x)
        return y if y is not None else self._linear(x, *self._quantize_input(x))

    def forward_gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """This layer applied to silu(gate)·up, the product formed inside the transform kernel
        (`modeling.fusion.FusedSwiGLU`)."""
        y = self._fused_decode_alone(gate, up)
        return y if y is not None else self._linear(gate, *self._quantize_input_uncached(gate, up))

    def _fused_decode_alone(self, x: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor | None:
        """`_fused_decode` of this layer's own weight; the option is checked first, so a call
        with it off (the default) builds nothing for it."""
        if not ops.FUSED_DECODE:
            return None
        return self._fused_decode(x, [self.packed_weight()], self.w_scale, self.w_zero, self._bias32(), up)

    def _fused_decode(self, x: torch.Tensor, weights: list[PackedWeight], scale: torch.Tensor, zero: torch.Tensor,
                      bias: torch.Tensor | None, up: torch.Tensor | None = None) -> torch.Tensor | None:
        """This layer's input transform and the decode GEMV of `weights` (this layer's, or its
        joined siblings' stacked) as one launch (`ops.fused_decode_linear`); None where that
        kernel does not serve the call (prefill, the Hadamard transform, …)."""
        if self.hadamard:
            return None
        return ops.fused_decode_linear(x, weights, scale, zero, bias, self.rot1, self.perm, self.rot2, self.act_bits,
                                       self.act_clip, self.act_symmetric, self._input_norm(), up, x.dtype)

    def _bias32(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(torch.float32)

    def _linear(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a, s = a.reshape(-1, self.in_features), s.reshape(-1)
        y = ops.w4a4_linear(a, s, self.packed_weight(), self._bias32(), x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        stages = [n for n in ("rot1", "perm", "rot2") if getattr(self, n) is not None]
        if self.hadamard:
            stages.append("hadamard")
        return (f"in_features={self.in_features}, out_features={self.out_features}, W4A{self.act_bits} real, "
                f"transform={'+'.join(stages) or 'none'}, bias={self.bias is not None}")


def _swap(model: nn.Module, kind: type, make) -> list[str]:
    names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, kind):
                replacement = make(child)
                if replacement is not None:
                    setattr(parent, child_name, replacement)
                    names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def to_simulated_backend(model: nn.Module) -> list[str]:
    """Undo `to_real_backend` in place (each RealQuantLinear back to its QuantLinear, with
    the buffers they share). Call it before `model.to(...)` moves the real layers: a move
    gives them new tensors and the simulated layers keep the old ones."""
    from .fused_rope import unfuse_rotary
    from .fusion import unfuse

    unfuse(model)
    unfuse_rotary(model)
    return _swap(model, RealQuantLinear, lambda layer: layer.source)


def share_sibling_transforms(model: nn.Module) -> int:
    """Mark sibling RealQuantLinears with equal transform factors as one transform.

    Each QuantLinear owns a copy of its group's factors (q/k/v, and gate/up, read one
    activation through one transform); the quantized-input memo of `RealQuantLinear`
    reuses codes only between layers with the same `transform_id`. Without this, every
    linear ran its own transform (7 per LLaMA layer instead of 4). The siblings then also
    hold the same factor tensors (until a `.to()` copies them apart, which the id
    survives). Returns how many layers joined a sibling's transform."""
    factors = ("rot1", "perm", "rot2")
    shared = 0
    same = lambda a, b: all(same_tensor(getattr(a, n), getattr(b, n)) for n in factors)  # noqa: E731
    for child, twin in siblings_with_twin(model, RealQuantLinear, same):
        if twin is not None:
            for name in factors:
                setattr(child, name, getattr(twin, name))
            child.transform_id = twin.transform_id
            shared += 1
    return shared


def to_real_backend(model: nn.Module, prefill_weight: str | None = None,
                    fuse: bool = True, join_decode: bool = True) -> dict[str, list[str]]:
    """Swap every `QuantLinear` of `model` that the kernels cover for a `RealQuantLinear`
    (in place); fuse: also fold the RMSNorms in front of them and SwiGLU's silu(gate)·up
    into their transform kernels (`modeling.fusion`; on by default: on the H100 it gave the
    same SmolLM2 perplexity and a faster layer, results/kernels/NOTES.md session 4), and
    run each attention's rotary embedding as one kernel (`modeling.fused_rope`);
    join_decode: at decode, run q/k/v and gate/up as one GEMV launch each
    (`modeling.joined_decode`). Returns {"real": [names], "simulated": [names kept
    simulated], "fused": [names of the fused norms and MLPs], "rope": [attention modules
    with the one-kernel RoPE]}."""
    real = _swap(model, QuantLinear, lambda layer: RealQuantLinear(layer, prefill_weight) if supports_real(layer) else None)
    share_sibling_transforms(model)
    if join_decode:
        from .joined_decode import join_sibling_decodes

        join_sibling_decodes(model)
    fused: list[str] = []
    rope: list[str] = []
    if fuse:
        from .fused_rope import fuse_rotary
        from .fusion import fuse_norms, fuse_swiglu

        fused = fuse_norms(model) + fuse_swiglu(model)
        rope = fuse_rotary(model)
    simulated = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    return {"real": real, "simulated": simulated, "fused": fused, "rope": rope}


@contextmanager
def real_layers(module: nn.Module, prefill_weight: str | None = "fp8") -> Iterator[None]:
    """`module`'s QuantLinears run on the W4A4 kernels inside the block, as they will be
    deployed (no norm fusion, no joined decode: the module may be a single decoder layer),
    and are put back after it, with the kernels' cached inputs and 8-bit weight copies
    dropped. Calibration runs each just-quantized layer this way with
    `QuantConfig.calib_forward="real"`."""
    to_real_backend(module, prefill_weight, fuse=False, join_decode=False)
    try:
        yield
    finally:
        to_simulated_backend(module)
        _MEMO.clear()
