"""A KV cache that holds the quantized keys and values themselves.

Without it, generation keeps full-precision K and V in a `DynamicCache` and the attention
function fake-quantizes the whole cache at every step. `QuantizedKVCache` instead quantizes
each new (token, head) row once, when it is stored, and keeps only integer codes (two 4-bit
codes per byte) with one scale and zero point per row:

    keys:   K after RoPE and after the Q/K Hadamard of the layer's AttentionQuantizer
    values: V as it is (QuaRot's per-head V Hadamard is already fused into v_proj)

The quantizer is the same per-row primitive the fake-quant path uses, with the layer's own
k_spec / v_spec, so decoding token by token with this cache sees exactly the numbers a
full-sequence forward (perplexity evaluation) sees. Reading dequantizes the stored codes and
hands those tensors to the AttentionQuantizer, which then skips its own K/V step.

Usage: `model.generate(..., past_key_values=QuantizedKVCache(model))`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..quant.packing import pack_codes, unpack_codes
from ..quant.quantizer import QuantSpec, compute_qparams, dequantize, quantize
from .adapters import adapter_for
from .attention import AttentionQuantizer


class QuantizedRows:
    """A growing [batch, heads, tokens, head_dim] tensor stored row-quantized (or as is, spec None)."""

    def __init__(self, spec: QuantSpec | None) -> None:
        self.spec = spec
        self.parts: tuple[torch.Tensor, ...] = ()  # (packed codes, scale, zero) or (values,)

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.spec is None:
            return (x,)
        scale, zero = compute_qparams(x, self.spec)  # one (scale, zero) per row: per (token, head)
        return pack_codes(quantize(x, scale, zero, self.spec), self.spec.bits), scale, zero

    def append(self, x: torch.Tensor) -> None:
        new = self._encode(x)
        self.parts = new if not self.parts else tuple(torch.cat((a, b), dim=-2) for a, b in zip(self.parts, new))

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        if self.spec is None:
            return self.parts[0]
        packed, scale, zero = self.parts
        return dequantize(unpack_codes(packed, self.spec.bits), scale, zero, 0, dtype)

    def map(self, fn) -> None:
        """Apply a token/batch selection (crop, beam reorder) to every stored part."""
        self.parts = tuple(fn(p) for p in self.parts)

    @property
    def length(self) -> int:
        return self.parts[0].shape[-2] if self.parts else 0

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)


class QuantizedKVLayer(CacheLayerMixin):
    """The cache of one attention layer; quantizes with that layer's AttentionQuantizer specs."""

    is_sliding = False  # keeps every token; a sliding-window mask still hides the old ones
    is_compileable = False
    is_croppable = True

    def __init__(self, quantizer: AttentionQuantizer) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.stored_keys = QuantizedRows(quantizer.k_spec)
        self.stored_values = QuantizedRows(quantizer.v_spec)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.stored_keys.append(self.quantizer.rotate_qk(key_states))
        self.stored_values.append(value_states)
        keys, values = self.stored_keys.read(self.dtype), self.stored_values.read(self.dtype)
        self.quantizer.expect_from_cache(keys, values)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.stored_keys.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.stored_keys = QuantizedRows(self.quantizer.k_spec)
        self.stored_values = QuantizedRows(self.quantizer.v_spec)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove:
            for rows in (self.stored_keys, self.stored_values):
                rows.map(lambda t: t[..., :tokens_to_remove, :])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for rows in (self.stored_keys, self.stored_values):
            rows.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for rows in (self.stored_keys, self.stored_values):
            rows.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for rows in (self.stored_keys, self.stored_values):
            rows.map(lambda t: t[indices, ...])

    def offload(self) -> None:
        raise NotImplementedError("QuantizedKVCache does not offload to the CPU")


class QuantizedKVCache(Cache):
    """One QuantizedKVLayer per decoder layer of a model quantized by duquant."""

    def __init__(self, model: nn.Module) -> None:
        adapter = adapter_for(model)
        layers = []
        for index, layer in enumerate(adapter.decoder_layers(model)):
            quantizer = getattr(layer.get_submodule(adapter.attention), "qkv_quantizer", None)
            if quantizer is None:
                raise ValueError(f"decoder layer {index} has no AttentionQuantizer: quantize the model first")
            layers.append(QuantizedKVLayer(quantizer))
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes the cache holds (codes, scales and zero points)."""
        return sum(layer.stored_keys.nbytes() + layer.stored_values.nbytes() for layer in self.layers)


def has_quantized_kv(model: nn.Module) -> bool:
    """Whether the model's attention quantizes K or V (then generation should use QuantizedKVCache)."""
    quantizers = [m for m in model.modules() if isinstance(m, AttentionQuantizer)]
    return any(q.k_spec is not None or q.v_spec is not None for q in quantizers)
