"""`duquant bench`: W4A4 speed against BF16 measured in the same run, on a CUDA device.

    main(["--level", "kernel" | "layer" | "e2e", "--out-json", F, "--out-md", F, ...])

kernel: the W4A4 linear (transform + quantize + 8-bit GEMM) at LLaMA-2-7B shapes
        (`duquant.bench.kernels`); layer: one LLaMA-2-7B decoder layer with random weights
        (prefill at sequence 2048, decode with a 2048-token KV cache, peak memory;
        `duquant.bench.layer`); e2e: a LLaMA-2-7B-shaped model with random weights
        (`duquant.bench.layer`, prefill latency, decode tokens/s, peak memory).
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="duquant bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--level", choices=["kernel", "layer", "e2e"], default="kernel")
    p.add_argument("--ms", type=int, nargs="*", default=None, help="kernel level: token counts M")
    p.add_argument("--batches", type=int, nargs="*", default=None, help="layer/e2e: prefill batch sizes")
    p.add_argument("--decode-batches", type=int, nargs="*", default=None, help="layer/e2e: decode batch sizes")
    p.add_argument("--layers", type=int, default=None, help="e2e: decoder layers (default 32, as LLaMA-2-7B)")
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("duquant bench needs a CUDA device")
        return 2
    if args.level == "kernel":
        from duquant.bench.kernels import DEFAULT_MS, LLAMA2_7B_SHAPES, run_kernel_bench
        run_kernel_bench(LLAMA2_7B_SHAPES, args.ms or DEFAULT_MS, args.out_json, args.out_md)
    else:
        from duquant.bench.layer import run_layer_bench
        run_layer_bench(args.level, args.batches, args.decode_batches, args.layers, args.out_json, args.out_md)
    return 0
