"""Online transform + quantize alone: the tiles kernel in one launch and in three, and the
whole-row kernel ("rows", triton_row_transform), eager (do_bench, median, cold L2) and
CUDA-graph (4 calls per replay) times, at LLaMA-2-7B K.

    PYTHONPATH=src python scripts/transform_timing.py --out-json t.json
"""
from __future__ import annotations

import argparse

import torch

from duquant.bench.kernels import _bench, _graph_bench, _orthogonal
from duquant.bench.output import write_results
from duquant.kernels.triton_row_transform import duquant_quantize_rows
from duquant.kernels.triton_transform import duquant_quantize


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", type=int, nargs="*", default=[1, 16, 64, 2048, 8192, 32768])
    p.add_argument("--ks", type=int, nargs="*", default=[4096, 11008])
    p.add_argument("--out-json", default=None)
    args = p.parse_args()
    rows = []
    lines = ["| K | M | one-launch µs (eager) | three-launch µs (eager) | rows µs (eager) | one-launch µs (graph) | "
             "three-launch µs (graph) | rows µs (graph) | bytes floor µs (3 TB/s) |", "|---|---|---|---|---|---|---|---|---|"]
    for k in args.ks:
        r1, r2 = _orthogonal(128, "cuda").to(torch.bfloat16), _orthogonal(128, "cuda").to(torch.bfloat16)
        perm, smooth = torch.randperm(k, device="cuda"), torch.rand(k, device="cuda") + 0.5
        for m in args.ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            r = {"K": k, "M": m}
            for name, fused in (("one", True), ("three", False)):
                call = lambda fused=fused: duquant_quantize(x, r1, perm, r2, smooth, out_dtype=torch.float8_e4m3fn,  # noqa: E731
                                                            fused=fused)
                r[f"{name}_eager_us"] = _bench(call)
                r[f"{name}_graph_us"] = _graph_bench([call] * 4)
            row_call = lambda: duquant_quantize_rows(x, r1, perm, r2, smooth, out_dtype=torch.float8_e4m3fn)  # noqa: E731
            r["rows_eager_us"] = _bench(row_call)
            r["rows_graph_us"] = _graph_bench([row_call] * 4)
            if m == 2048:  # tile sweep of the three-launch form (GPU time)
                for bm, sub, wp in ((64, 1, 4), (64, 2, 4), (64, 4, 4), (64, 8, 4), (64, 4, 8), (128, 2, 8), (32, 8, 4)):
                    r[f"three_bm{bm}_sub{sub}_w{wp}_graph_us"] = _graph_bench([lambda bm=bm, sub=sub, wp=wp: duquant_quantize(
                        x, r1, perm, r2, smooth, out_dtype=torch.float8_e4m3fn, fused=False, block_m=bm, sub_tiles=sub,
                        warps=wp)] * 4)
                print({a: round(b, 1) for a, b in r.items() if "sub" in a}, flush=True)
            r["floor_us"] = m * k * 3 / 3.0e6
            rows.append(r)
            lines.append(f"| {k} | {m} | {r['one_eager_us']:.1f} | {r['three_eager_us']:.1f} | {r['rows_eager_us']:.1f} | "
                         f"{r['one_graph_us']:.1f} | {r['three_graph_us']:.1f} | {r['rows_graph_us']:.1f} | "
                         f"{r['floor_us']:.1f} |")
            print(lines[-1], flush=True)
    md = f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + "\n".join(lines) + "\n"
    print(md)
    write_results({"rows": rows, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}, md, args.out_json, None)


if __name__ == "__main__":
    main()
