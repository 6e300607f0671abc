"""The full-precision parts of a decoder layer on kernels while calibrating.

Calibration runs every decoder layer over the whole calibration set three times (the FP
statistics pass, the quantized prefix's statistics pass, the quantized forward). On a
LLaMA-2-7B layer and 128 × 2048 tokens, transformers' RMSNorm (six float32 kernels per
norm) and RoPE (five kernels per tensor) are a good part of what is not GEMM in those
passes (results/kernels/NOTES.md, session 9). Where Triton runs, `calibration_kernels`
routes them through the one-kernel versions for the duration of the calibration and puts
transformers' ops back afterwards; modules someone fused before are left as they were.
DUQUANT_CALIBRATION_KERNELS=0 keeps transformers' ops (to compare the two).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from ..kernels import ops
from .fused_rms_norm import fuse_rms_norms, unfuse_rms_norms
from .fused_rope import fuse_rotary, unfuse_rotary


@contextmanager
def calibration_kernels(model: nn.Module, device: torch.device):
    """RMSNorm and RoPE of `model` on kernels inside the context, when `device` runs Triton."""
    if os.environ.get("DUQUANT_CALIBRATION_KERNELS") == "0" or not ops.use_triton(torch.empty(0, device=device)):
        yield
        return
    rope, norms = fuse_rotary(model), fuse_rms_norms(model)
    try:
        yield
    finally:
        unfuse_rotary(model, rope)
        unfuse_rms_norms(model, norms)
