"""Programmatic dependent launch (PDL, sm_90+): the decode GEMV may start while the
transform kernel before it still runs, and spend that time fetching its weight into L2.

Two halves, both Triton instructions that are no-ops unless the launch asks for PDL:
  * the transform kernel calls `gdc_launch_dependents()` when it starts (its dependents may
    be scheduled from then on, on the SMs it leaves free: one program at M = 1);
  * the GEMV is launched with `launch_pdl=True` and calls `gdc_wait()` before it reads
    anything the transform wrote (`triton_decode.w4a8_gemv_kernel`).
Inside a CUDA-graph capture the launch attribute becomes a programmatic edge of the graph.

Off by default: measured on the H100 (results/kernels/session7/, transform → GEMV chains as
CUDA graphs, weights cycled past L2) it did not pay. With one L2 prefetch per 128-byte line
the chains took 0.95–1.14× of the plain launch's time (gains at M = 1, losses at M = 4); with
one bulk prefetch per row 0.80–0.92×, and a decoder layer's decode step got slower (1.74×
instead of 1.82× BF16 at batch 1). A weight that already sits in L2 would save up to ~5 µs
per q/k/v group at M = 1, so the idea has room; the prefetch traffic delays the transform's
own latency-bound loads. Session 8, with the RoPE kernel: e2e decode at batch 1 2.11× BF16
with PDL against 2.06× without (4.09 against 4.20 ms per step), again within run-to-run spread.
DUQUANT_DECODE_PDL=1 turns it on.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Iterator

import torch

# Read at every decode call (`ops.w4a4_linear`), so `decode_pdl` can switch it for a block.
DECODE_PDL = os.environ.get("DUQUANT_DECODE_PDL", "0") == "1"


@contextmanager
def decode_pdl(enabled: bool) -> Iterator[None]:
    """Launch the decode GEMVs with (True) or without PDL inside the block (the benchmark's
    ablation; a CUDA graph keeps what was set when it was captured)."""
    global DECODE_PDL
    previous, DECODE_PDL = DECODE_PDL, enabled
    try:
        yield
    finally:
        DECODE_PDL = previous


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """PDL needs a real GPU of compute capability ≥ 9.0 (`griddepcontrol`); never in
    Triton's CPU interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)
