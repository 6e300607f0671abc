"""Diagnostic: the tiles transform at small M (why M = 1 took 23 µs and M = 16 13.5 µs on the
H100). CUDA-graph time per call (4 calls per replay), one-launch and three-launch, for M in
1..16 and for M = 1 zero-padded to 16 rows.

    PYTHONPATH=src python scripts/transform_small_m.py --out-json small_m.json
"""
from __future__ import annotations

import argparse

import torch

from duquant.bench.kernels import _graph_bench, _orthogonal
from duquant.bench.output import write_results
from duquant.kernels.triton_transform import duquant_quantize


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", type=int, nargs="*", default=[1, 2, 4, 8, 15, 16, 32])
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--out-json", default=None)
    args = p.parse_args()
    k = args.k
    r1, r2 = _orthogonal(128, "cuda").to(torch.bfloat16), _orthogonal(128, "cuda").to(torch.bfloat16)
    perm, smooth = torch.randperm(k, device="cuda"), torch.rand(k, device="cuda") + 0.5
    rows, lines = [], ["| M | input | one-launch µs | three-launch µs |", "|---|---|---|---|"]
    cases = [(m, "random", torch.randn(m, k, device="cuda").to(torch.bfloat16)) for m in args.ms]
    padded = torch.zeros(16, k, device="cuda", dtype=torch.bfloat16)
    padded[:1] = cases[0][2][:1]
    cases.append((16, "M=1 zero-padded to 16", padded))
    ramp = torch.randn(16, k, device="cuda").to(torch.bfloat16)
    ramp[1:] = ramp[:1]  # 16 copies of one token
    cases.append((16, "one token repeated 16×", ramp))
    for m, what, x in cases:
        r = {"M": m, "input": what}
        for name, fused in (("one", True), ("three", False)):
            r[f"{name}_graph_us"] = _graph_bench([lambda x=x, fused=fused: duquant_quantize(
                x, r1, perm, r2, smooth, out_dtype=torch.int8, fused=fused)] * 4)
        rows.append(r)
        lines.append(f"| {m} | {what} | {r['one_graph_us']:.1f} | {r['three_graph_us']:.1f} |")
        print(lines[-1], flush=True)
    # Which kernels one call launches, and their GPU time (the graph time above includes gaps).
    from torch.profiler import ProfilerActivity, profile
    for m, what, x in (cases[0], cases[-3]):
        for fused in (True, False):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    duquant_quantize(x, r1, perm, r2, smooth, out_dtype=torch.int8, fused=fused)
                torch.cuda.synchronize()
            print(f"--- M={m} ({what}), fused={fused}, 20 calls")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=60))
    md = f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, K = {k}\n\n" + "\n".join(lines) + "\n"
    print(md)
    write_results({"rows": rows}, md, args.out_json, None)


if __name__ == "__main__":
    main()
