"""Where the decode transform's time goes (one token, the rows kernel), on the GPU:
CUDA-graph µs per call of

1. the kernel with its stages switched on one by one (quantize only → + R̂₁ → + permutation →
   + R̂₂), against a PyTorch elementwise op on the same row (the launch floor of a graph node);
2. the whole kernel with 4 / 8 / 16 warps, and the tiles kernel's three launches for reference
   (session 8 also measured variants not kept: every factor load issued at the start, every
   factor line asked from L2 first, the permutation through a global scratch row; their
   numbers are in results/kernels/session8/);

each with the factors hot (the same ones every call: they stay in L2) and cold (cycled through
more factor sets than L2 holds, as in a model's decode step, where the weights stream between
two uses of a layer's factors). x is the same every call (in a model it was just written).

    PYTHONPATH=src python scripts/transform_breakdown.py --out-json breakdown.json --out-md breakdown.md
"""
from __future__ import annotations

import argparse

import torch

from duquant.bench.kernels import _graph_bench, _orthogonal
from duquant.bench.output import report
from duquant.kernels.norm import InputNorm
from duquant.kernels.triton_row_transform import duquant_quantize_rows
from duquant.kernels.triton_transform import duquant_quantize

L2_BYTES = 60 << 20  # more than the H100's 50 MB L2
CASES = [(4096, "RMSNorm", 1), (4096, "RMSNorm", 4), (11008, "SwiGLU", 1)]


def _factor_sets(k: int, op: str, count: int) -> list[dict]:
    sets = []
    for _ in range(count):
        norm = InputNorm(torch.rand(k, device="cuda").to(torch.bfloat16) + 0.5, 1e-5) if op == "RMSNorm" else None
        sets.append(dict(rot1=_orthogonal(128, "cuda").to(torch.bfloat16), perm=torch.randperm(k, device="cuda"),
                         rot2=_orthogonal(128, "cuda").to(torch.bfloat16), norm=norm))
    return sets


def _time(fn, sets: list[dict]) -> float:
    return _graph_bench([lambda f=f: fn(f) for f in sets])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    args = p.parse_args()
    torch.manual_seed(0)

    from duquant.kernels import triton_transform
    triton_transform._PREP.max_entries = 1 << 16  # every factor set prepared once, before the capture
    rows, lines = [], ["| K, op | M | variant | hot factors µs | cold factors µs |", "|---|---|---|---|---|"]
    for k, op, m in CASES:
        per_set = 2 * 128 * 128 * 2 + k * (8 + 2)  # R̂₁, R̂₂ (bf16), perm (int64 + int32 copy), norm weight
        cold_sets = _factor_sets(k, op, L2_BYTES // per_set + 1)
        hot_sets = cold_sets[:1] * 8
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        up = torch.randn(m, k, device="cuda").to(torch.bfloat16) if op == "SwiGLU" else None
        base_w = 4 if k <= 4096 else 8
        ref_a, ref_s = duquant_quantize_rows(x, smooth=None, up=up, **cold_sets[0])

        def rows_fn(warps=None, stages=("rot1", "perm", "rot2")):
            def fn(f):
                kw = {n: (f[n] if n in stages else None) for n in ("rot1", "perm", "rot2")}
                return duquant_quantize_rows(x, smooth=None, norm=f["norm"], up=up, warps=warps or base_w, **kw)
            return fn

        variants = {"PyTorch elementwise op on x (launch floor)": lambda f: torch.neg(x)}
        for stages, name in (((), "quantize only"), (("rot1",), "+ R1"), (("rot1", "perm"), "+ R1 + permutation")):
            variants[f"rows, stages: {name}"] = rows_fn(stages=stages)
        for warps in sorted({base_w, 2 * base_w}):
            variants[f"rows, {warps} warps"] = rows_fn(warps)
        variants["tiles, three launches"] = lambda f: duquant_quantize(x, f["rot1"], f["perm"], f["rot2"], None,
                                                                       fused=False, norm=f["norm"], up=up)
        for name, fn in variants.items():
            flips = None
            if name.startswith("rows") and "stages" not in name:  # a wrong variant must not look fast
                a, s = fn(cold_sets[0])
                flips = float((a != ref_a).float().mean())  # other warp counts may round a code differently
                assert flips < 1e-3 and float(((s - ref_s).abs() / ref_s).max()) < 1e-3, (name, flips)
            hot, cold = _time(fn, hot_sets), _time(fn, cold_sets)
            rows.append({"K": k, "op": op, "M": m, "variant": name, "hot_us": hot, "cold_us": cold,
                         "codes_differing_from_default": flips})
            lines.append(f"| {k}, {op} | {m} | {name} | {hot:.1f} | {cold:.1f} |")
            print(lines[-1], flush=True)
        del cold_sets, hot_sets
        torch.cuda.empty_cache()
    report({"transform_breakdown": rows}, lines, "CUDA-graph µs per call", args.out_json, args.out_md)


if __name__ == "__main__":
    main()
