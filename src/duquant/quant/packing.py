"""Storage of integer codes: two 4-bit codes per byte along the last dimension.

Codes of 2..4 bits are stored as nibbles (low nibble = even column, high nibble = odd
column); codes of 5..8 bits are stored one per byte. The packed form is what a
checkpoint holds and what the decode kernels read.
"""
from __future__ import annotations

import torch


def packs_nibbles(bits: int) -> bool:
    return bits <= 4


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2^bits) -> packed uint8 tensor (last dim halved for bits <= 4)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if not packs_nibbles(bits):
        return codes.contiguous()
    if codes.shape[-1] % 2:
        raise ValueError(f"packing 4-bit codes needs an even last dimension, got {codes.shape[-1]}")
    low = codes[..., 0::2]
    high = codes[..., 1::2]
    return (low | (high << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`."""
    if not packs_nibbles(bits):
        return packed
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
