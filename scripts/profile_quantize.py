"""Where the GPU time of DuQuant quantization goes: torch.profiler over a short run of the
LLaMA-2-7B-shaped quantization benchmark (a few layers, the full 128 × 2048 calibration set).

    python scripts/profile_quantize.py --layers 2 --batch-size 8 --out-dir out/

Prints (and writes to out-dir) the kernels and operators by total GPU time and by host
time; it explains the stage split of `duquant bench --level quantize` kernel by kernel.
The profiler slows the host side down, so read its seconds as shares, not as the runtime.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from duquant.bench.layer import llama2_7b_config, random_llama
from duquant.bench.quantization import STAGES, random_calibration
from duquant.config import QuantConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=35)
    parser.add_argument("--out-dir", default="out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calib-forward", choices=["simulated", "real"], default="simulated")
    args = parser.parse_args()
    pipeline = importlib.import_module("duquant.quantize")
    device = torch.device(args.device)
    model = random_llama(llama2_7b_config(args.layers), device, torch.float16 if device.type == "cuda" else torch.float32)
    calibration = random_calibration(args.nsamples, args.seqlen, model.config.vocab_size)
    # Label each stage function of the pipeline, so the trace can be split by stage.
    originals = {name: getattr(pipeline, name) for name in STAGES if hasattr(pipeline, name)}
    for name, fn in originals.items():
        def labelled(*a, _fn=fn, _name=name, **k):
            with record_function(f"stage:{_name}"):
                return _fn(*a, **k)
        setattr(pipeline, name, labelled)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        config = QuantConfig(method="duquant", calib_forward=args.calib_forward)
        pipeline.quantize(model, config, calibration, device=device, batch_size=args.batch_size, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    averages = prof.key_averages()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sorts = ("cuda_time_total", "self_cuda_time_total") if device.type == "cuda" else ("cpu_time_total",)
    for sort in sorts + ("self_cpu_time_total",):
        table = averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=70)
        (out / f"profile_quantize_{sort}.txt").write_text(table)
        print(f"=== sorted by {sort}\n{table}")
    table = by_stage(prof.events())
    (out / "profile_quantize_by_stage.md").write_text(table)
    print(f"=== by stage (outermost)\n{table}")


def by_stage(events) -> str:
    """Per outermost stage: host time inside it, and the GPU kernel time it launched (each
    kernel counted once, through its launching op's chain of parents). A stage whose GPU time
    is well under its host time left the GPU idle (host-bound, or waiting on syncs)."""
    host: dict[str, float] = {}
    gpu: dict[str, float] = {}
    kernels: dict[str, dict[str, float]] = {}

    def outermost_stage(event) -> str:
        stage = "(outside any stage)"
        while event is not None:
            if event.name.startswith("stage:"):
                stage = event.name[len("stage:"):]
            event = event.cpu_parent
        return stage

    for event in events:
        if event.name.startswith("stage:") and outermost_stage(event.cpu_parent) == "(outside any stage)":
            name = event.name[len("stage:"):]
            host[name] = host.get(name, 0.0) + event.time_range.elapsed_us() / 1e6
        for kernel in getattr(event, "kernels", []) or []:
            stage = outermost_stage(event)
            gpu[stage] = gpu.get(stage, 0.0) + kernel.duration / 1e6
            per = kernels.setdefault(stage, {})
            per[kernel.name] = per.get(kernel.name, 0.0) + kernel.duration / 1e6
    lines = ["| stage | host s (profiled) | GPU kernel s | top kernels (s) |", "|---|---|---|---|"]
    for stage in sorted(set(host) | set(gpu), key=lambda s: -gpu.get(s, 0.0)):
        top = sorted(kernels.get(stage, {}).items(), key=lambda kv: -kv[1])[:6]
        names = "; ".join(f"{n[:48]} {t:.3f}" for n, t in top)
        lines.append(f"| {stage} | {host.get(stage, 0.0):.3f} | {gpu.get(stage, 0.0):.3f} | {names} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
