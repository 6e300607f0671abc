"""Typed, versioned quantization settings.

`QuantConfig` is the single object that says how a model is quantized. It round-trips
through a plain dict (`to_dict` / `from_dict`) and is written into every saved model, so a
checkpoint always says exactly how it was made.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .quant.quantizer import QuantSpec

CONFIG_VERSION = 1
METHODS = ("rtn", "smoothquant", "duquant", "quarot")
WEIGHT_QUANTIZERS = ("rtn", "gptq")
FULL_PRECISION_BITS = 16

# Method defaults that differ between methods; `None` in the config means "use these".
_DEFAULT_ALPHA = {"smoothquant": 0.5, "duquant": 0.6}


def _clip(explicit: float | None, bits: int, low_bit_ratio: float) -> float:
    """The clip ratio in force: an explicit one, else the paper's ratio at <= 4 bits and 1.0 above."""
    if explicit is not None:
        return explicit
    return low_bit_ratio if bits <= 4 else 1.0


def _check_bits(name: str, bits: int) -> None:
    if not (2 <= bits <= 8 or bits == FULL_PRECISION_BITS):
        raise ValueError(f"{name} must be in 2..8 or 16 (not quantized), got {bits}")


@dataclass
class QuantConfig:
    """How to quantize a model. Paper (DuQuant) behaviour by default."""

    method: str = "duquant"
    # --- bit-widths (16 = keep in 16 bit) ---
    wbits: int = 4
    abits: int = 4
    qkv_bits: int | None = None  # Q, K, V attention operands; None: equal to abits
    kv_bits: int | None = None  # overrides qkv_bits for K and V (the KV cache); None: qkv_bits
    quantize_q: bool = True  # DuQuant quantizes Q too; QuaRot/FlatQuant keep Q in 16 bit
    # --- quantizer shapes ---
    w_symmetric: bool = False
    a_symmetric: bool = False
    kv_symmetric: bool | None = None  # None: same as a_symmetric
    # Clip ratios; None = automatic: the paper's W4A4 ratios (W 0.8, A 0.9, Q/K 0.9) at 4 bits or
    # fewer, no clipping at 5 bits or more (measured on SmolLM2: the fixed ratios cost W8A8
    # DuQuant 7.5% perplexity, unclipped it is within 0.2% of FP; see results/README.md).
    w_clip: float | None = None
    a_clip: float | None = None
    qk_clip: float | None = None  # Q and K after their Hadamard
    v_clip: float = 1.0
    w_group_size: int = 0  # 0: one group per output channel
    # --- weight rounding ---
    weight_quantizer: str = "rtn"
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    # --- smoothing (SmoothQuant, DuQuant) ---
    smooth: bool = True  # DuQuant ablation switch; SmoothQuant always smooths
    smooth_alpha: float | None = None  # None: 0.6 for duquant, 0.5 for smoothquant
    smooth_weight_stat: str = "group"  # "group": max over the group (paper); "first": reference code
    # --- DuQuant rotations ---
    rotations: int = 2  # 0, 1 (R1 only) or 2 (R1 · P · R2)
    permute: bool = True
    block_size: int | None = None  # None: 128, or the largest power of two dividing the layer
    rotation_steps: int = 256
    exchange: str = "column"  # "column": the outlier's channel (paper); "row": reference quirk
    prefix_criterion: str = "absmax"  # "absmax" (paper) or "range" (reference: max − min)
    # --- QuaRot ---
    rotation: str = "hadamard"  # residual rotation: "hadamard" (random ±1 · Hadamard) or "random" (Haar orthogonal)
    # --- calibration procedure ---
    # How the quantized prefix (the stream that feeds the next layer's rotation statistics and
    # GPTQ) runs a just-quantized layer: "simulated" (fake quantization, float32 transforms, the
    # reference protocol) or "real" (the W4A4 kernels the deployed model runs; much faster on
    # CUDA, on the CPU their PyTorch references). Not used by QuaRot.
    calib_forward: str = "simulated"
    # --- reproducibility ---
    seed: int = 0
    version: int = CONFIG_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("wbits", "abits"):
            _check_bits(name, getattr(self, name))
        for name in ("qkv_bits", "kv_bits"):
            if getattr(self, name) is not None:
                _check_bits(name, getattr(self, name))
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f"weight_quantizer must be one of {WEIGHT_QUANTIZERS}, got {self.weight_quantizer!r}")
        if self.rotations not in (0, 1, 2):
            raise ValueError(f"rotations must be 0, 1 or 2, got {self.rotations}")
        if self.block_size is not None and (self.block_size < 1 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.exchange not in ("column", "row"):
            raise ValueError(f"exchange must be 'column' or 'row', got {self.exchange!r}")
        if self.prefix_criterion not in ("absmax", "range"):
            raise ValueError(f"prefix_criterion must be 'absmax' or 'range', got {self.prefix_criterion!r}")
        if self.smooth_weight_stat not in ("group", "first"):
            raise ValueError(f"smooth_weight_stat must be 'group' or 'first', got {self.smooth_weight_stat!r}")
        if self.rotation not in ("hadamard", "random"):
            raise ValueError(f"rotation must be 'hadamard' or 'random', got {self.rotation!r}")
        if self.calib_forward not in ("simulated", "real"):
            raise ValueError(f"calib_forward must be 'simulated' or 'real', got {self.calib_forward!r}")
        if self.rotation_steps < 0:
            raise ValueError("rotation_steps must be >= 0")
        # Validate the clip ratios once, here, through the spec constructor.
        for clip in (self.w_clip, self.a_clip, self.qk_clip, self.v_clip):
            if clip is not None:
                QuantSpec(bits=4, clip=clip)

    # --- derived settings -------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return self.smooth_alpha if self.smooth_alpha is not None else _DEFAULT_ALPHA.get(self.method, 0.5)

    @property
    def uses_smoothing(self) -> bool:
        return self.method == "smoothquant" or (self.method == "duquant" and self.smooth)

    def weight_spec(self) -> QuantSpec | None:
        if self.wbits == FULL_PRECISION_BITS:
            return None
        return QuantSpec(self.wbits, self.w_symmetric, _clip(self.w_clip, self.wbits, 0.8), self.w_group_size)

    def act_spec(self) -> QuantSpec | None:
        if self.abits == FULL_PRECISION_BITS:
            return None
        return QuantSpec(self.abits, self.a_symmetric, _clip(self.a_clip, self.abits, 0.9))

    def _attention_bits(self, kv: bool) -> int:
        bits = self.qkv_bits if self.qkv_bits is not None else self.abits
        if kv and self.kv_bits is not None:
            bits = self.kv_bits
        return bits

    def _attention_symmetric(self) -> bool:
        return self.a_symmetric if self.kv_symmetric is None else self.kv_symmetric

    def q_spec(self) -> QuantSpec | None:
        bits = self._attention_bits(kv=False)
        if not self.quantize_q or bits == FULL_PRECISION_BITS:
            return None
        return QuantSpec(bits, self._attention_symmetric(), _clip(self.qk_clip, bits, 0.9))

    def k_spec(self) -> QuantSpec | None:
        bits = self._attention_bits(kv=True)
        if bits == FULL_PRECISION_BITS:
            return None
        return QuantSpec(bits, self._attention_symmetric(), _clip(self.qk_clip, bits, 0.9))

    def v_spec(self) -> QuantSpec | None:
        bits = self._attention_bits(kv=True)
        return None if bits == FULL_PRECISION_BITS else QuantSpec(bits, self._attention_symmetric(), self.v_clip)

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "QuantConfig":
        """A config in one of the two evaluation settings of PRESETS; `overrides` win."""
        return cls(**(preset_settings(preset) | overrides))

    def describe(self) -> str:
        """Short label such as 'duquant W4A4' used in logs and tables."""
        label = f"{self.method} W{self.wbits}A{self.abits}"
        if self.kv_bits is not None:
            label += f"KV{self.kv_bits}"
        if self.weight_quantizer != "rtn":
            label += f" ({self.weight_quantizer})"
        return label

    # --- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown quantization settings: {sorted(unknown)}")
        if data.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise ValueError(
                f"this checkpoint was written by a newer duquant (config version {data['version']}); upgrade duquant"
            )
        return cls(**data)


# The two evaluation settings in which the DuQuant and QuaRot papers compare each other
# (DuQuant paper Tables F20-F22). A preset fixes the quantizer shapes, not the method, so
# that either method can be run in either setting; explicit settings override it.
PRESETS: dict[str, dict[str, Any]] = {
    # DuQuant: asymmetric W and A, Q quantized too, K/V at the activation bits, automatic clip
    # ratios (W 0.8, A/Q/K 0.9 at <= 4 bits, none above), V unclipped, RTN weights.
    "duquant": dict(w_symmetric=False, a_symmetric=False, kv_symmetric=None, quantize_q=True, qkv_bits=None,
                    kv_bits=None, w_clip=None, a_clip=None, qk_clip=None, v_clip=1.0, weight_quantizer="rtn"),
    # QuaRot: symmetric W and A, Q in 16 bit, KV cache 4 bit asymmetric (group = head_dim)
    # with clip 0.95, activations clip 0.9, GPTQ weights without a clip ratio (QuaRot clips
    # neither RTN nor GPTQ weights by a fixed ratio).
    "quarot": dict(w_symmetric=True, a_symmetric=True, kv_symmetric=False, quantize_q=False, qkv_bits=None,
                   kv_bits=4, w_clip=1.0, a_clip=0.9, qk_clip=0.95, v_clip=0.95, weight_quantizer="gptq"),
}


def preset_settings(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[preset])
