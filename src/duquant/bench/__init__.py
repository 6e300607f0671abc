"""`duquant bench`: W4A4 speed against BF16 measured in the same run, and DuQuant's
quantization runtime, on a CUDA device.

    main(["--level", "kernel" | "layer" | "e2e" | "quantize", "--out-json", F, "--out-md", F, ...])

kernel: the W4A4 linear (transform + quantize + 8-bit GEMM) at LLaMA-2-7B shapes
        (`duquant.bench.kernels`);
layer: one LLaMA-2-7B decoder layer with random weights, BF16 vs W4A4 vs W4A4 with an FP8
       prefill weight copy: prefill at sequence 2048, decode with a 2048-token KV cache
       (CUDA graph), peak memory, GPU kernel time by stage (`duquant.bench.layer`);
e2e: a LLaMA-2-7B-shaped model (32 layers) with random weights, BF16 vs W4A4: prefill
     latency, decode tokens/s, peak memory (`duquant.bench.layer`);
quantize: DuQuant W4A4 quantization runtime of a LLaMA-2-7B-shaped random model in float16,
          calibration = --nsamples × 2048 random token ids (`duquant.bench.quantization`).
"""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    from duquant.bench.layer import DEFAULT_VARIANTS, VARIANTS  # torch is imported with the package already

    p = argparse.ArgumentParser(prog="duquant bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--level", choices=["kernel", "layer", "e2e", "quantize"], default="kernel")
    p.add_argument("--ms", type=int, nargs="*", default=None, help="kernel level: token counts M")
    p.add_argument("--batches", type=int, nargs="*", default=None,
                   help="layer/e2e: prefill batch sizes (the flag without values: no prefill)")
    p.add_argument("--decode-batches", type=int, nargs="*", default=None,
                   help="layer/e2e: decode batch sizes (0: no decode)")
    p.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                   help="layer/e2e: variants (default " + ", ".join(f"{level}: {' '.join(names)}" for level, names
                                                                   in DEFAULT_VARIANTS.items()) + ")")
    p.add_argument("--layers", type=int, default=None,
                   help="e2e/quantize: decoder layers (default 32, as LLaMA-2-7B; the layer level uses 1)")
    p.add_argument("--nsamples", type=int, default=128, help="quantize: calibration sequences of 2048 tokens")
    p.add_argument("--calib-batch-size", type=int, default=8,
                   help="quantize: calibration sequences per layer forward (8, as `duquant quantize`)")
    p.add_argument("--calib-forward", choices=["simulated", "real"], default="simulated",
                   help="quantize: run each just-quantized layer simulated or on the W4A4 kernels "
                        "(QuantConfig.calib_forward)")
    p.add_argument("--no-profile", action="store_true", help="layer/e2e: skip the kernel-time breakdown")
    p.add_argument("--no-graph-prefill", action="store_true",
                   help="layer/e2e: skip the CUDA-graph prefill timings (eager prefill only)")
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("duquant bench needs a CUDA device")
        return 2
    if args.level == "kernel":
        from duquant.bench.kernels import DEFAULT_MS, LLAMA2_7B_SHAPES, run_kernel_bench
        run_kernel_bench(LLAMA2_7B_SHAPES, args.ms or DEFAULT_MS, args.out_json, args.out_md)
    elif args.level == "quantize":
        from duquant.bench.quantization import run_quantize_bench
        run_quantize_bench(args.layers or 32, args.nsamples, out_json=args.out_json, out_md=args.out_md,
                           batch_size=args.calib_batch_size, calib_forward=args.calib_forward)
    else:
        from duquant.bench.layer import run_layer_bench
        run_layer_bench(args.level, args.batches, args.decode_batches, args.layers, args.out_json, args.out_md,
                        variants=args.variants, profile=not args.no_profile,
                        graph_prefill=not args.no_graph_prefill)
    return 0
