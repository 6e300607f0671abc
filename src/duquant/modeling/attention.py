"""Quantization of the attention operands (Q, K after RoPE; V) through transformers' attention interface.

The model keeps its own attention modules. We register an attention function named
"duquant" that quantizes Q, K and V per (token, head) and then runs PyTorch's SDPA; each
attention module carries an `AttentionQuantizer` describing what to do. Q and K are first
multiplied by a normalised Hadamard of size head_dim (which leaves Q·Kᵀ unchanged and
spreads their outliers); the softmax output stays in 16 bit.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..kernels import ops
from ..quant.quantizer import QuantSpec
from ..transforms.hadamard import apply_hadamard

ATTENTION_NAME = "duquant"


class AttentionQuantizer(nn.Module):
    """What to do with Q, K, V of one attention module (no parameters of its own)."""

    def __init__(self, q_spec: QuantSpec | None, k_spec: QuantSpec | None, v_spec: QuantSpec | None,
                 qk_hadamard: bool) -> None:
        super().__init__()
        self.q_spec, self.k_spec, self.v_spec = q_spec, k_spec, v_spec
        self.qk_hadamard = qk_hadamard

    def rotate_qk(self, x: torch.Tensor) -> torch.Tensor:
        return apply_hadamard(x) if self.qk_hadamard else x

    # Shapes [batch, heads, tokens, head_dim]: a row of the last dim is one (token, head).
    # Hadamard and quantizer run as one kernel on CUDA (ops.fake_quantize_heads).
    def quantize_query(self, query: torch.Tensor) -> torch.Tensor:
        return ops.fake_quantize_heads(query, self.q_spec, self.qk_hadamard)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, from_cache: bool = False):
        """Q, K, V as the attention sees them; K and V as they are when a quantized cache made them."""
        if not from_cache:
            key = ops.fake_quantize_heads(key, self.k_spec, self.qk_hadamard)
            value = ops.fake_quantize_heads(value, self.v_spec, False)
        return self.quantize_query(query), key, value

    # --- hand-over from a quantized KV cache (modeling/kv_cache.py) -----------------------
    # A quantized KV cache rotates and quantizes K and V itself when it stores them; it hands
    # the exact tensors it returns to this quantizer, which then must not rotate or quantize
    # them a second time. Identity (`is`), not equality, so no other tensor is ever skipped.
    # A static cache at a one-token step may hand stand-ins instead, with itself as
    # `undecoded`: the attention then reads its codes directly (`quantized_attention`).
    _from_cache: tuple | None = None

    def expect_from_cache(self, key: torch.Tensor, value: torch.Tensor, undecoded=None) -> None:
        self._from_cache = (key, value, undecoded)

    def take_from_cache(self, key: torch.Tensor, value: torch.Tensor) -> tuple | None:
        """(key, value, undecoded) if the cache handed exactly these tensors over, else None."""
        handed, self._from_cache = self._from_cache, None  # dropped at once: the cache owns the memory
        return handed if handed is not None and handed[0] is key and handed[1] is value else None

    def extra_repr(self) -> str:
        bits = lambda s: 16 if s is None else s.bits  # noqa: E731
        return f"Q{bits(self.q_spec)} K{bits(self.k_spec)} V{bits(self.v_spec)}, qk_hadamard={self.qk_hadamard}"


def quantized_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    quantizer = getattr(module, "qkv_quantizer", None)
    if quantizer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    handed = quantizer.take_from_cache(key, value)
    undecoded = handed[2] if handed is not None else None
    if undecoded is None:
        query, key, value = quantizer(query, key, value, from_cache=handed is not None)
    else:  # a static cache kept this step's K/V as codes only: attend from them
        query = quantizer.quantize_query(query)
        out = undecoded.attend(query, attention_mask, kwargs)
        if out is not None:
            return out, None
        key, value = undecoded.read()
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    """Make `attn_implementation="duquant"` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, quantized_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_quantized_attention(model: nn.Module) -> None:
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
