"""Where the host (Python) time of the W4A4 path goes, on a CUDA device: cProfile over
(1) eager prefill forwards of one LLaMA-2-7B-shaped W4A4 layer, (2) eager calls of the
DuQuant transform at M = 2048, K = 4096, (3) DuQuant quantization of a 2-layer 7B-shaped
model (calibration's host work: fitting, swaps, syncs).

    python scripts/host_profile.py --out-dir out/ [--variant w4a4_fp8w_fused] [--batch 1]

For each part it prints the wall time per call (device synchronized around the loop) next to
the GPU time of the same work (CUDA events around a CUDA-graph replay where it applies), and
the functions with the most own (tottime) and cumulative host time. A part whose wall time
exceeds its GPU time is host-bound; the profile says which Python code holds it up. cProfile
itself slows Python down, so read its numbers as shares.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from duquant.cuda_graphs import capture


def _stats(profiler: cProfile.Profile, rows: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return out.getvalue()


def _wall_us(fn, calls: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def _graph_us(fn, replays: int = 10) -> float:
    graph, _ = capture(fn, 2)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays * 1e3


def profile_part(name: str, fn, calls: int, rows: int, out: Path, graph: bool = True) -> str:
    for _ in range(3):
        fn()
    wall = _wall_us(fn, calls)
    gpu = _graph_us(fn) if graph else float("nan")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    text = f"=== {name}: wall {wall:.1f} µs per call, GPU (graph replay) {gpu:.1f} µs\n" + _stats(profiler, rows)
    (out / f"host_profile_{name}.txt").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="out")
    parser.add_argument("--variant", default="w4a4_fp8w_fused")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--skip-quantize", action="store_true")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")

    from duquant.bench.layer import build_variant, llama2_7b_config
    from duquant.kernels.triton_transform import duquant_quantize

    torch.manual_seed(0)
    with torch.no_grad():
        model = build_variant(llama2_7b_config(1), args.variant, device)
        h = torch.randn(args.batch, 2048, 4096, device=device, dtype=torch.bfloat16)
        print(profile_part(f"layer_prefill_b{args.batch}_{args.variant}",
                           lambda: model.model(inputs_embeds=h, use_cache=False), 20, args.rows, out))
        del model
        x = torch.randn(2048, 4096, device=device, dtype=torch.bfloat16)
        r1, _ = torch.linalg.qr(torch.randn(128, 128, device=device))
        r2, _ = torch.linalg.qr(torch.randn(128, 128, device=device))
        perm, smooth = torch.randperm(4096, device=device), torch.rand(4096, device=device) + 0.5
        print(profile_part("transform_m2048", lambda: duquant_quantize(x, r1, perm, r2, smooth,
                                                                       out_dtype=torch.float8_e4m3fn), 200, args.rows, out))
    if args.skip_quantize:
        return
    from duquant.bench.layer import random_llama
    from duquant.bench.quantization import random_calibration
    from duquant.config import QuantConfig
    from duquant.quantize import quantize

    model = random_llama(llama2_7b_config(2), device, torch.float16)
    calibration = random_calibration(128, 2048, model.config.vocab_size)
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    profiler.enable()
    report = quantize(model, QuantConfig(method="duquant"), calibration, device=device, batch_size=8, progress=False)
    torch.cuda.synchronize()
    profiler.disable()
    text = (f"=== quantize, 2 layers: {time.perf_counter() - t:.2f} s under cProfile; stages {report.stage_seconds}\n"
            + _stats(profiler, 40))
    (out / "host_profile_quantize.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
