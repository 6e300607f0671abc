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

`StaticQuantizedKVCache` holds the same codes in buffers allocated once for a fixed number of
tokens and written in place at a position kept on the device, like transformers'
`StaticCache`: a decode step then has fixed shapes and addresses and can be recorded as a
CUDA graph (`graph_generate`). A one-token step on CUDA attends straight from the codes
(`kernels/triton_decode_attention`); otherwise the whole buffer is dequantized (its unwritten rows
read as zeros and are masked), as `QuantizedKVCache` dequantizes all it holds.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, StaticLayer

from ..kernels import ops
from ..quant.quantizer import QuantSpec
from ..quant.row_codes import decode_rows, encode_rows, zero_rows
from .adapters import adapter_for
from .attention import AttentionQuantizer


class QuantizedRows:
    """A growing [batch, heads, tokens, head_dim] tensor stored row-quantized (or as is, spec None)."""

    def __init__(self, spec: QuantSpec | None) -> None:
        self.spec = spec
        self.parts: tuple[torch.Tensor, ...] = ()  # (packed codes, scale, zero) or (values,)

    def append(self, x: torch.Tensor) -> None:
        new = encode_rows(x, self.spec)
        self.parts = new if not self.parts else tuple(torch.cat((a, b), dim=-2) for a, b in zip(self.parts, new))

    def read(self, dtype: torch.dtype) -> torch.Tensor:
        return decode_rows(self.parts, self.spec, dtype)

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
        super().__init__(layers=[QuantizedKVLayer(quantizer) for quantizer in _attention_quantizers(model)])

    def nbytes(self) -> int:
        """Bytes the cache holds (codes, scales and zero points)."""
        return sum(layer.stored_keys.nbytes() + layer.stored_values.nbytes() for layer in self.layers)


class StaticQuantizedKVLayer(StaticLayer):
    """`QuantizedKVLayer` in preallocated buffers for `max_cache_len` tokens. As in
    transformers' StaticLayer, the write position `cumulative_length` is a device tensor that
    every update advances in place, and the mask covers all `max_cache_len` positions (the
    causal mask hides those not written yet)."""

    def __init__(self, max_cache_len: int, quantizer: AttentionQuantizer) -> None:
        super().__init__(max_cache_len)
        self.quantizer = quantizer
        self.key_parts: tuple[torch.Tensor, ...] = ()
        self.value_parts: tuple[torch.Tensor, ...] = ()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Zeroed buffers for max_cache_len rows (zero codes with zero scale read as 0: no NaN
        reaches the masked positions)."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.key_parts = zero_rows(*shape, self.k_head_dim, self.quantizer.k_spec, self.dtype, self.device)
        self.value_parts = zero_rows(*shape, self.v_head_dim, self.quantizer.v_spec, self.dtype, self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        quantizer = self.quantizer
        # Written at the current position, which then advances (all on the device).
        ops.store_row_codes(key_states, quantizer.k_spec, quantizer.qk_hadamard, self.key_parts,
                            self.cumulative_length)
        ops.store_row_codes(value_states, quantizer.v_spec, False, self.value_parts, self.cumulative_length)
        self.cumulative_length.add_(key_states.shape[-2])
        if ops.decode_attention_supported(key_states, quantizer.k_spec, quantizer.v_spec):
            # One new token: the attention reads the codes (`attend`); hand over stand-ins.
            keys, values = self.key_parts[0], self.value_parts[0]
            quantizer.expect_from_cache(keys, values, undecoded=self)
            return keys, values
        keys, values = self.read()
        quantizer.expect_from_cache(keys, values)
        return keys, values

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of all max_cache_len positions, dequantized to the model dtype."""
        quantizer = self.quantizer
        return (ops.load_row_codes(self.key_parts, quantizer.k_spec, self.k_head_dim, self.dtype),
                ops.load_row_codes(self.value_parts, quantizer.v_spec, self.v_head_dim, self.dtype))

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, options: dict) -> torch.Tensor | None:
        """Attention of one query token over the codes (`ops.decode_attention`), or None when that
        kernel does not serve this call."""
        return ops.decode_attention(query, self.key_parts, self.value_parts, mask, options.get("scaling"), options)

    def reset(self) -> None:
        for buffer in self.key_parts + self.value_parts:
            buffer.zero_()
        self.cumulative_length.zero_()

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.key_parts + self.value_parts)


class StaticQuantizedKVCache(Cache):
    """`QuantizedKVCache` with fixed-size buffers (`StaticQuantizedKVLayer`), for CUDA-graph decoding."""

    def __init__(self, model: nn.Module, max_cache_len: int) -> None:
        super().__init__(layers=[StaticQuantizedKVLayer(max_cache_len, quantizer)
                                 for quantizer in _attention_quantizers(model)])

    def nbytes(self) -> int:
        """Bytes the cache holds (codes, scales and zero points of all max_cache_len positions)."""
        return sum(layer.nbytes() for layer in self.layers)


def _attention_quantizers(model: nn.Module) -> list[AttentionQuantizer]:
    adapter = adapter_for(model)
    quantizers = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        quantizer = getattr(layer.get_submodule(adapter.attention), "qkv_quantizer", None)
        if quantizer is None:
            raise ValueError(f"decoder layer {index} has no AttentionQuantizer: quantize the model first")
        quantizers.append(quantizer)
    return quantizers


def has_quantized_kv(model: nn.Module) -> bool:
    """Whether the model's attention quantizes K or V (then generation should use QuantizedKVCache)."""
    quantizers = [m for m in model.modules() if isinstance(m, AttentionQuantizer)]
    return any(q.k_spec is not None or q.v_spec is not None for q in quantizers)
