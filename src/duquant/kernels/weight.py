"""The stored form of a W4 linear weight, and the layouts the GPU kernels read.

A checkpoint holds 4-bit codes packed two per byte (`duquant.quant.packing`), plus a
per-output-channel (or per-group) scale and zero point. The decode kernel reads exactly
that. The prefill GEMM runs on 8-bit tensor cores (Hopper has no INT4 MMA), so it needs
b = q − z in an 8-bit carrier: `prepare_weight(..., prefill="int8"|"fp8")` keeps such a
copy (N·K bytes, i.e. 3× the packed size in total); `prefill=None` keeps only the packed
codes and the prefill path expands them into a transient buffer on each call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from duquant.quant.packing import pack_codes, unpack_codes
from duquant.quant.quantizer import QuantSpec, compute_qparams, quantize

# Largest |q − z| that float8 e4m3 represents exactly as an integer (every integer ≤ 16).
_FP8_EXACT = 16


@dataclass
class PackedWeight:
    """W4 weight of a linear layer y = x·Wᵀ, W: [N, K].

    packed: uint8 [N, K/2] (two codes per byte, low nibble = even column).
    scale, zero: float32 [N] (per channel) or [N, K/group_size] (group-wise).
    w8: optional int8 or float8_e4m3fn [N, K] copy of q − z for the prefill GEMM.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    in_features: int
    bits: int = 4
    group_size: int = 0
    w8: torch.Tensor | None = field(default=None)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def codes(self) -> torch.Tensor:
        """Unsigned codes uint8 [N, K]."""
        return unpack_codes(self.packed, self.bits)

    def centered(self, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        """b = q − z as [N, K] in `dtype` (per-channel zero only)."""
        if self.group_size:
            raise ValueError("an 8-bit carrier of q − z needs a per-channel zero point")
        b = self.codes().to(torch.int16) - self.zero.round().to(torch.int16)[:, None]
        return b.to(torch.float32).to(dtype) if dtype.is_floating_point else b.to(dtype)

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part (honest memory accounting for reports)."""
        out = {
            "packed": self.packed.numel() * self.packed.element_size(),
            "scale_zero": (self.scale.numel() + self.zero.numel()) * 4,
        }
        if self.w8 is not None:
            out["w8"] = self.w8.numel() * self.w8.element_size()
        out["total"] = sum(out.values())
        return out

    def to(self, device: torch.device | str) -> "PackedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(move(self.packed), move(self.scale), move(self.zero), self.in_features,
                            self.bits, self.group_size, move(self.w8))


def _check_centered_range(codes: torch.Tensor, zero: torch.Tensor, prefill: str) -> None:
    b = codes.to(torch.int16) - zero.round().to(torch.int16)[:, None]
    limit = _FP8_EXACT if prefill == "fp8" else 127
    worst = int(b.abs().max()) if b.numel() else 0
    if worst > limit:
        raise ValueError(f"|q − z| reaches {worst}, not exact in the {prefill} carrier (limit {limit}); "
                         "use prefill='int8' or a zero point inside the code range")


def prepare_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 4,
                   group_size: int = 0, prefill: str | None = None) -> PackedWeight:
    """Pack uint8 codes [N, K] and keep the layouts the kernels want.

    prefill: None (packed only; prefill expands on the fly), "int8" or "fp8" (keep an
    [N, K] 8-bit copy of q − z for the prefill tensor-core GEMM).
    """
    if bits != 4:
        raise ValueError("the W4 kernels store 4-bit codes; got bits={bits}")
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise TypeError("codes must be uint8 [N, K]")
    n, k = codes.shape
    n_groups = k // group_size if group_size else 1
    scale = scale.reshape(n, n_groups).to(torch.float32)
    zero = zero.reshape(n, n_groups).to(torch.float32)
    if not group_size:
        scale, zero = scale[:, 0].contiguous(), zero[:, 0].contiguous()
    w = PackedWeight(pack_codes(codes, bits), scale, zero, k, bits, group_size)
    if prefill is not None:
        if prefill not in ("int8", "fp8"):
            raise ValueError(f"prefill must be None, 'int8' or 'fp8', got {prefill!r}")
        _check_centered_range(codes, zero if not group_size else zero[:, 0], prefill)
        w.w8 = w.centered(torch.int8 if prefill == "int8" else torch.float8_e4m3fn).contiguous()
    return w


def quantize_weight(weight: torch.Tensor, bits: int = 4, clip: float = 1.0, group_size: int = 0,
                    prefill: str | None = None) -> PackedWeight:
    """Round-to-nearest asymmetric W4 of a float weight [N, K] with the shared quantizer."""
    spec = QuantSpec(bits=bits, symmetric=False, clip=clip, group_size=group_size)
    scale, zero = compute_qparams(weight, spec)
    codes = quantize(weight, scale, zero, spec)
    return prepare_weight(codes, scale, zero, bits, group_size, prefill)
