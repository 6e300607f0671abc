"""Per-stage GPU time of a forward pass: torch.profiler kernel times summed by category.

`kernel_category` maps a CUDA kernel name to one stage of the W4A4 (or BF16) linear
layer; it is a pure function of the name so that it can be tested on CPU. Kernel names
come from cuBLAS (`sm90_xmma_gemm_*`, `nvjet_*`), CUTLASS, PyTorch and our Triton kernels
(`duquant.kernels`: rot1_scatter / rot2_stats / rot2_quant / transform_quant,
expand_w4, int8_gemm, w4a8_decode, w4a8_gemv).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

TRANSFORM, EXPAND, GEMM8, GEMM16, ATTENTION, DECODE, OTHER = (
    "online transform", "weight expansion", "8-bit GEMM", "BF16 GEMM", "attention", "decode GEMM", "other")
CATEGORIES = (TRANSFORM, EXPAND, GEMM8, GEMM16, ATTENTION, DECODE, OTHER)

# our packed-weight decode GEMMs (int8-MMA kernel; dp4a GEMV, before "gemv" means BF16)
_DECODE_WORDS = ("w4a8_decode", "w4a8_gemv")
_ATTENTION_WORDS = ("flash", "fmha", "sdpa", "attention", "attn", "softmax")
_GEMM_WORDS = ("gemm", "gemv", "cutlass", "nvjet", "xmma", "wgmma", "cublas", "matmul", "scaled_mm", "splitkreduce")
_TRANSFORM_WORDS = ("rot1_scatter", "rot2_stats", "rot2_quant", "transform", "quant")
# 8-bit operand markers in GEMM names: fp8 (e4m3/e5m2; cuBLAS 12.8+ "nvjet_qq…"), int8 (s8/i8, IMMA).
_EIGHT_BIT_TOKENS = {"s8", "i8", "int8", "f8", "fp8", "e4m3", "e5m2", "imma"}
_EIGHT_BIT_PARTS = ("e4m3", "e5m2", "fp8", "int8", "i16832", "i8816")


def _is_eight_bit_gemm(name: str) -> bool:
    tokens = [t for t in re.split(r"[^a-z0-9]+", name) if t]
    if "scaled_mm" in name or any(t in _EIGHT_BIT_TOKENS for t in tokens):
        return True
    if any(part in t for t in tokens for part in _EIGHT_BIT_PARTS):
        return True
    return "nvjet" in name and any(t.startswith("qq") for t in tokens)


def kernel_category(name: str) -> str:
    """Stage of a CUDA kernel, from its name. Order matters: attention kernels are often
    CUTLASS templates (checked before GEMMs), and CUTLASS GEMM names can contain
    "transform" (checked before the online transform)."""
    n = name.lower()
    if any(w in n for w in _DECODE_WORDS):
        return DECODE
    if "expand_w4" in n:
        return EXPAND
    if any(w in n for w in _ATTENTION_WORDS):
        return ATTENTION
    if any(w in n for w in _GEMM_WORDS):
        return GEMM8 if _is_eight_bit_gemm(n) else GEMM16
    if any(w in n for w in _TRANSFORM_WORDS):
        return TRANSFORM
    return OTHER


def _device_us(event) -> float:
    """Device time of one key_averages() entry; torch ≥ 2.4 says device_time_total, older cuda_time_total."""
    for attr in ("device_time_total", "cuda_time_total"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def _is_device_event(event) -> bool:
    # Kernels, memcpy and memset are entries of device type CUDA; CPU ops would count their kernels twice.
    return str(getattr(event, "device_type", "")).upper().endswith("CUDA")


def kernel_times_us(averages: Iterable) -> dict[str, float]:
    """{kernel name: total µs} from `prof.key_averages()` (device entries only)."""
    return {name: us for name, (us, _) in kernel_stats(averages).items()}


def kernel_stats(averages: Iterable) -> dict[str, tuple[float, int]]:
    """{kernel name: (total µs, launches)} from `prof.key_averages()` (device entries only)."""
    out: dict[str, tuple[float, int]] = {}
    for event in averages:
        if _is_device_event(event):
            us, n = out.get(event.key, (0.0, 0))
            out[event.key] = (us + _device_us(event), n + int(getattr(event, "count", 1)))
    return out


def by_category(kernel_us: dict[str, float]) -> dict[str, float]:
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for name, us in kernel_us.items():
        totals[kernel_category(name)] += us
    return totals


def profile_breakdown(fn: Callable[[], object], device: torch.device, top: int = 12, per: int = 1) -> dict[str, object]:
    """Run `fn` once under torch.profiler (CUDA activity; call it warm) and return GPU µs by
    category, the total, the kernel launches by category, the `top` longest kernels with
    their category (to check the categorizer against real names), and every kernel with its
    launches (`kernels`, to find what a stage is made of). per: `fn` runs that many
    steps; every figure is divided by it (per step)."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        raise ValueError("the kernel breakdown needs a CUDA device")
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    stats = {name: (us / per, n / per) for name, (us, n) in kernel_stats(prof.key_averages()).items()}
    kernels = {name: us for name, (us, _) in stats.items()}
    launches = dict.fromkeys(CATEGORIES, 0.0)
    for name, (_, n) in stats.items():
        launches[kernel_category(name)] += n
    longest = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    every = sorted(stats.items(), key=lambda kv: -kv[1][0])
    return {"us": by_category(kernels), "total_us": sum(kernels.values()), "launches": launches,
            "top_kernels": [{"name": k[:160], "us": v, "category": kernel_category(k)} for k, v in longest],
            "kernels": [{"name": k[:160], "us": us, "launches": n, "category": kernel_category(k)}
                        for k, (us, n) in every]}


def breakdown_markdown(per_variant: dict[str, dict]) -> str:
    """Category × variant table of GPU µs (with the share of the variant's total)."""
    if not per_variant:
        return ""
    names = list(per_variant)
    lines = ["| stage | " + " | ".join(f"{v} µs" for v in names) + " |", "|---" * (len(names) + 1) + "|"]
    for cat in CATEGORIES:
        cells = []
        for v in names:
            us, total = per_variant[v]["us"][cat], per_variant[v]["total_us"] or 1.0
            cells.append(f"{us:.0f} ({100 * us / total:.0f}%)" if us else "—")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines.append("| **total GPU kernel time** | " + " | ".join(f"**{per_variant[v]['total_us']:.0f}**" for v in names)
                 + " |")
    if all("launches" in per_variant[v] for v in names):
        lines.append("| kernel launches | " + " | ".join(f"{sum(per_variant[v]['launches'].values()):.0f}"
                                                        for v in names) + " |")
    return "\n".join(lines) + "\n"
