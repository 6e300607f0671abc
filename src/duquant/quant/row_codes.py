"""Row-quantized storage of attention keys and values: packed integer codes with one scale and
zero point per row of the last dimension (per token and head, for [batch, heads, tokens,
head_dim] tensors). The KV caches of `modeling/kv_cache.py` hold these parts; the kernels of
`kernels/triton_kv_quant.py` write and read the same layout."""
from __future__ import annotations

import torch

from .packing import pack_codes, packs_nibbles, unpack_codes
from .quantizer import QuantSpec, compute_qparams, dequantize, quantize


def encode_rows(x: torch.Tensor, spec: QuantSpec | None) -> tuple[torch.Tensor, ...]:
    """x [..., head_dim] → (packed uint8 codes, float32 scale [..., 1], float32 zero [..., 1]),
    or (x,) as it is when spec is None (16 bit)."""
    if spec is None:
        return (x,)
    scale, zero = compute_qparams(x, spec)
    return pack_codes(quantize(x, scale, zero, spec), spec.bits), scale, zero


def decode_rows(parts: tuple[torch.Tensor, ...], spec: QuantSpec | None, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `encode_rows` (up to the quantization error), in `dtype`."""
    if spec is None:
        return parts[0]
    packed, scale, zero = parts
    return dequantize(unpack_codes(packed, spec.bits), scale, zero, 0, dtype)


def zero_rows(batch: int, heads: int, length: int, head_dim: int, spec: QuantSpec | None, dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, ...]:
    """Zeroed parts for `length` rows per (batch, head), laid out as `encode_rows` returns them
    (zero codes with zero scale decode to 0). Scales are float32 (float64 for a float64 model)."""
    lead = (batch, heads, length)
    if spec is None:
        return (torch.zeros(*lead, head_dim, dtype=dtype, device=device),)
    width = head_dim // 2 if packs_nibbles(spec.bits) else head_dim
    qdtype = torch.float64 if dtype == torch.float64 else torch.float32
    groups = 1 if spec.group_size in (0, head_dim) else head_dim // spec.group_size
    return (torch.zeros(*lead, width, dtype=torch.uint8, device=device),
            torch.zeros(*lead, groups, dtype=qdtype, device=device), torch.zeros(*lead, groups, dtype=qdtype, device=device))
