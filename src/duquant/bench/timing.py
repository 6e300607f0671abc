"""Timing, memory and environment helpers shared by the layer, e2e and quantize benchmarks.

Every helper takes the device: on CUDA, GPU time comes from CUDA events and memory from
the caching allocator; on the CPU (tests with tiny models) wall time comes from
`time.perf_counter` and memory is not reported (None).
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of one `fn()` over `reps` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def reset_peak_memory(device: torch.device) -> None:
    """Free cached blocks and restart the peak counter, so the next peak belongs to one measurement."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def allocated_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def environment(device: torch.device) -> dict[str, object]:
    """What the numbers were measured on: device name and library versions."""
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # not installed (CPU CI) or broken: the benches still run without it
        triton_version = None
    from duquant.kernels import dependent_launch, ops

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    return {"device": str(device), "gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "transformers": transformers.__version__, "python": sys.version.split()[0],
            "transform_kernel": ops.TRANSFORM_KERNEL, "rows_max_m": ops.ROWS_MAX_M, "rows_max_k": ops.ROWS_MAX_K,
            "decode_gemv_max_m": ops.DECODE_GEMV_MAX_M, "decode_pdl": dependent_launch.DECODE_PDL}


def environment_line(env: dict[str, object]) -> str:
    return (f"Device: {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
            f"transformers {env['transformers']}")
