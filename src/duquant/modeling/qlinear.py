"""`QuantLinear`: the drop-in replacement for `nn.Linear` in a quantized model.

forward(x) = linear(quant_A(x·G), dequant(W_q)) + bias, where G is the layer's online
transform (identity for RTN) and W_q the integer weight codes of W·G. The weight is stored
as packed integer codes with a scale and zero point per output channel (or group), so a
saved model holds exactly the numbers that were computed at quantization time and reloads
to identical logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.packing import pack_codes, unpack_codes
from ..kernels import ops
from ..quant.quantizer import QuantSpec, dequantize
from ..transforms.online import OnlineTransform, same_transform
from .input_memo import InputMemo, siblings_with_twin

_MEMO = InputMemo()


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_spec: QuantSpec | None,
        act_spec: QuantSpec | None,
        transform: OnlineTransform | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.input_transform = transform
        if weight_spec is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        else:
            n_groups = 1 if weight_spec.group_size == 0 else in_features // weight_spec.group_size
            packed_cols = in_features // 2 if weight_spec.bits <= 4 else in_features
            self.register_buffer("qweight", torch.zeros(out_features, packed_cols, dtype=torch.uint8))
            self.register_buffer("w_scale", torch.ones(out_features, n_groups, dtype=torch.float32))
            self.register_buffer("w_zero", torch.zeros(out_features, n_groups, dtype=torch.float32))
            self.weight = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.compute_dtype = dtype
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None
        # Linears with the same share key quantize their (identical) inputs once: see
        # `share_sibling_inputs`. Not saved: loading sets it again.
        self.input_share_key: object | None = None

    # --- construction -----------------------------------------------------------------
    def set_weight(self, weight: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> None:
        """Store the (already transformed) weight: full precision, or integer codes."""
        if self.weight_spec is None:
            self.weight.data.copy_(weight.to(self.weight.dtype))
        else:
            self.qweight.copy_(pack_codes(codes, self.weight_spec.bits))
            self.w_scale.copy_(scale.to(torch.float32).reshape(self.w_scale.shape))
            self.w_zero.copy_(zero.to(torch.float32).reshape(self.w_zero.shape))
        self._weight_cache = None

    # --- inference --------------------------------------------------------------------
    def weight_codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.weight_spec.bits)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight_spec is None:
            return self.weight.to(dtype)
        # Cache the dequantized weight; the key changes when the module moves or is reloaded.
        key = (self.qweight.data_ptr(), self.qweight.device, dtype, self.qweight._version)
        if self._weight_cache is None or self._weight_cache[0] != key:
            w = dequantize(self.weight_codes(), self.w_scale, self.w_zero, self.weight_spec.group_size, dtype)
            self._weight_cache = (key, w)
        return self._weight_cache[1]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """fake_quant(x·G): the activation as the quantized layer sees it (x·G cast back to
        x's dtype first; on CUDA the cast and the quantizer run as one kernel)."""
        y = x if self.input_transform is None else self.input_transform.apply_float(x)
        return ops.fake_quantize_cast(y, self.act_spec, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_share_key is None or (self.input_transform is None and self.act_spec is None):
            x = self.quantize_input(x)
        else:
            x = _MEMO.lookup(x, self.input_share_key, lambda: self.quantize_input(x))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        w = "16" if self.weight_spec is None else f"{self.weight_spec.bits}"
        a = "16" if self.act_spec is None else f"{self.act_spec.bits}"
        return f"in_features={self.in_features}, out_features={self.out_features}, W{w}A{a}, bias={self.bias is not None}"


def share_sibling_inputs(model: nn.Module) -> int:
    """Give sibling QuantLinears (children of one module) that apply the same transform and
    activation quantizer one share key, so a common input is quantized once (q/k/v, gate/up).

    Only the same input *object* is ever reused (see `InputMemo`), so a key shared by
    linears that read different activations (o_proj next to q_proj under RTN) is harmless.
    Returns how many linears joined a sibling's key."""
    shared = 0
    same = lambda a, b: a.act_spec == b.act_spec and same_transform(a.input_transform, b.input_transform)  # noqa: E731
    for child, twin in siblings_with_twin(model, QuantLinear, same):
        child.input_share_key = object() if twin is None else twin.input_share_key
        shared += twin is not None
    return shared
