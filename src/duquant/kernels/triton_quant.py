"""Triton device helpers shared by the transform kernels: per-token quantization (asymmetric
or symmetric) with the shared quantizer's arithmetic as PyTorch runs it on the CPU (float32,
IEEE division, round half to even). PyTorch on CUDA divides the range by 2^b − 1 through a
float32 reciprocal instead, so a scale here can differ from the CUDA quantizer's in the last
bit; the parity tests allow for that (one code). `triton_fake_quant`, which must be bit-exact,
follows its device.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# The fast (bf16) transform kernels form codes through a reciprocal of the scale instead of
# an IEEE division (centered_codes RECIP): H100, M = 2048…32768, 8–16% less time for the
# tiles kernel and up to 20% for the rows kernel; 1 code in ~10⁷ moves by one step
# (results/kernels/NOTES.md, session 11). Precise mode keeps the division.
# DUQUANT_FAST_QUANT=0 keeps it everywhere.
FAST_QUANT = os.environ.get("DUQUANT_FAST_QUANT", "1") == "1"


def reciprocal_codes(precise: bool, fast_quant: bool | None) -> bool:
    """Whether a transform kernel call forms codes through a reciprocal (RECIP)."""
    return (FAST_QUANT and not precise) if fast_quant is None else fast_quant


@triton.jit
def rint(v):
    # Adding and subtracting 1.5·2^23 rounds a float32 |v| < 2^22 to the nearest integer,
    # ties to even (the rounding of the add itself), as torch.round does. Unlike
    # libdevice.rint it also runs in Triton's CPU interpreter.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def asym_qparams(row_min, row_max, clip, qmax):
    """Scale Δ = (max − min)·clip / qmax (≥ 1e-8) and zero z = −round(min·clip / Δ), per row."""
    lo = row_min * clip
    hi = row_max * clip
    scale = tl.maximum(tl.math.div_rn(hi - lo, qmax), 1e-8)
    zero = -rint(tl.math.div_rn(lo, scale))
    return scale, zero


@triton.jit
def centered_codes(y, scale, zero, qmax, RECIP: tl.constexpr = False):
    """q − z for y [R, C] given per-row scale/zero [R]: q = clamp(round(y/Δ) + z, 0, qmax).
    RECIP: y·(1/Δ) instead of the IEEE division (~10 instructions less per element; a code
    differs only where y/Δ lies within an ulp of a rounding boundary)."""
    if RECIP:
        q = rint(y * (1.0 / scale)[:, None]) + zero[:, None]
    else:
        q = rint(tl.math.div_rn(y, scale[:, None])) + zero[:, None]
    q = tl.minimum(tl.maximum(q, 0.0), qmax)
    return tl.minimum(tl.maximum(q - zero[:, None], -128.0), 127.0)


@triton.jit
def sym_qparams(row_min, row_max, clip, qmax):
    """Symmetric: Δ = clip·max|y| / (2^(b−1) − 1) (≥ 1e-8) and z = 2^(b−1) (qmax = 2^b − 1)."""
    half = (qmax + 1.0) * 0.5
    amax = tl.maximum(-row_min, row_max) * clip
    scale = tl.maximum(tl.math.div_rn(amax, half - 1.0), 1e-8)
    return scale, tl.zeros_like(scale) + half


@triton.jit
def token_qparams(row_min, row_max, clip, qmax, SYMMETRIC: tl.constexpr):
    if SYMMETRIC:
        return sym_qparams(row_min, row_max, clip, qmax)
    return asym_qparams(row_min, row_max, clip, qmax)
