"""The prefill transform (M = 2048…32768) kernel by kernel, and what the W4A4 linear needs
from it: CUDA-graph µs per call of the tiles kernel (three launches, the prefill default
until session 11) and the rows kernel in several forms (IEEE division or a reciprocal in the
quantizer, registers capped so that two programs share an SM, tokens per program), next to
BF16 and FP8 GEMMs of the LLaMA-2-7B shapes timed the same way. Each variant's codes are
compared with the tiles kernel's (fraction of codes that differ; a wrong kernel must not
look fast). The transform has no smoothing (the model folds it into the producers) and
absorbs what it absorbs in the model: nothing (o_proj), the RMSNorm (q/k/v, gate/up), the
SwiGLU (down_proj).

    PYTHONPATH=src python scripts/transform_prefill.py --out-json t.json --out-md t.md
"""
from __future__ import annotations

import argparse

import torch

from duquant.bench.kernels import _graph_bench, _orthogonal
from duquant.bench.output import report
from duquant.kernels.norm import InputNorm
from duquant.kernels.triton_row_transform import duquant_quantize_rows
from duquant.kernels.triton_transform import duquant_quantize

CASES = [(4096, "none"), (4096, "RMSNorm"), (11008, "SwiGLU")]
SHAPES = {4096: [(4096, 4096), (11008, 4096)], 11008: [(4096, 11008)]}  # (N, K) fed by each K


def _small_m_variants(k: int) -> dict[str, dict]:
    """--small-m: the kernel the model runs (tiles or rows at its default tile) against the rows
    kernel with few tokens per program (more programs, shorter chains)."""
    v = {"tiles": dict(kernel="tiles"), "rows (row_tile)": dict(kernel="rows")}
    for t in (1, 2):
        for w in (4, 8):
            v[f"rows, T={t}, {w} warps"] = dict(kernel="rows", tokens_per_program=t, warps=w)
    return v


def _variants(k: int) -> dict[str, dict]:
    v = {"tiles": dict(kernel="tiles", fast_quant=False), "tiles, reciprocal": dict(kernel="tiles", fast_quant=True),
         "rows": dict(kernel="rows", fast_quant=False), "rows, reciprocal": dict(kernel="rows", fast_quant=True),
         "rows, reciprocal, ≤128 regs": dict(kernel="rows", fast_quant=True, max_regs=128)}
    if k == 4096:
        v["rows, reciprocal, T=2, 4 warps, ≤128 regs"] = dict(kernel="rows", fast_quant=True, max_regs=128,
                                                              tokens_per_program=2, warps=4)
        v["rows, reciprocal, T=2, 4 warps"] = dict(kernel="rows", fast_quant=True, tokens_per_program=2, warps=4)
    else:
        v["rows, reciprocal, 4 warps"] = dict(kernel="rows", fast_quant=True, warps=4)
    return v


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", type=int, nargs="*", default=[2048, 8192, 32768])
    p.add_argument("--small-m", action="store_true",
                   help="decode and small-batch M (default 1…256): tokens per program and warps of the rows kernel "
                        "against tiles; no linear table")
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    args = p.parse_args()
    if args.small_m and args.ms == p.get_default("ms"):
        args.ms = [1, 2, 4, 8, 16, 64, 256]
    variants = _small_m_variants if args.small_m else _variants
    torch.manual_seed(0)

    rows, lines = [], ["| K, fused op | M | variant | µs | codes ≠ tiles | bytes floor µs (3 TB/s) |", "|---|---|---|---|---|---|"]
    best: dict[tuple[int, int], float] = {}
    for k, op in CASES:
        r1, r2 = _orthogonal(128, "cuda").to(torch.bfloat16), _orthogonal(128, "cuda").to(torch.bfloat16)
        perm = torch.randperm(k, device="cuda")
        norm = InputNorm(torch.rand(k, device="cuda").to(torch.bfloat16) + 0.5, 1e-5) if op == "RMSNorm" else None
        for m in args.ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            up = torch.randn(m, k, device="cuda").to(torch.bfloat16) if op == "SwiGLU" else None
            floor = m * k * ((4 if up is not None else 2) + 1) / 3.0e6
            ref_a = None
            for name, v in variants(k).items():
                v = dict(v)
                kernel = v.pop("kernel")
                if kernel == "tiles":
                    fn = lambda v=v: duquant_quantize(x, r1, perm, r2, None, out_dtype=torch.float8_e4m3fn,  # noqa: E731
                                                      fused=False, norm=norm, up=up, **v)
                else:
                    fn = lambda v=v: duquant_quantize_rows(x, r1, perm, r2, None, out_dtype=torch.float8_e4m3fn,  # noqa: E731
                                                           norm=norm, up=up, **v)
                a, s = fn()
                if ref_a is None:
                    ref_a, ref_s = a.float(), s
                flips = float((a.float() != ref_a).float().mean())
                assert flips < 1e-3 and float(((s - ref_s).abs() / ref_s).max()) < 1e-3, (name, flips)
                us = _graph_bench([fn] * 4)
                if op != "RMSNorm":
                    best[(k, m)] = min(best.get((k, m), float("inf")), us)
                rows.append({"K": k, "op": op, "M": m, "variant": name, "us": us, "codes_differing": flips,
                             "floor_us": floor})
                lines.append(f"| {k}, {op} | {m} | {name} | {us:.1f} | {flips:.1e} | {floor:.1f} |")
                print(lines[-1], flush=True)
            x = up = None  # free before the next size
            torch.cuda.empty_cache()
    lin = ["", "Linear (no fused op, as the kernel bench): CUDA-graph µs; W4A4 = the fastest transform above + the "
           "FP8 GEMM (cuBLAS `_scaled_mm`, row-wise scales, bf16 out); the last column is the transform time "
           "that would give 1.5×.", "",
           "| N×K | M | BF16 | FP8 GEMM | fastest transform | W4A4 | speedup | transform for 1.5× |",
           "|---|---|---|---|---|---|---|---|"]
    for k, shapes in ({} if args.small_m else SHAPES).items():
        for n, kk in shapes:
            w = torch.randn(n, kk, device="cuda").to(torch.bfloat16)
            w8 = (w / w.abs().amax(1, keepdim=True) * 15).round().to(torch.float8_e4m3fn)
            sw = torch.rand(1, n, device="cuda") + 0.5
            for m in args.ms:
                x = torch.randn(m, kk, device="cuda").to(torch.bfloat16)
                a8 = (x * 4).round().clamp(-15, 15).to(torch.float8_e4m3fn)
                sx = torch.rand(m, 1, device="cuda") + 0.5
                bf16 = _graph_bench([lambda: x @ w.t()] * 4)
                fp8 = _graph_bench([lambda: torch._scaled_mm(a8, w8.t(), sx, sw, out_dtype=torch.bfloat16)] * 4)
                tr = best[(k, m)]
                total = fp8 + tr
                rows.append({"N": n, "K": kk, "M": m, "bf16_us": bf16, "fp8_gemm_us": fp8, "transform_us": tr,
                             "w4a4_us": total, "speedup": bf16 / total, "transform_for_1p5_us": bf16 / 1.5 - fp8})
                lin.append(f"| {n}×{kk} | {m} | {bf16:.1f} | {fp8:.1f} | {tr:.1f} | {total:.1f} | {bf16 / total:.2f}× "
                           f"| {bf16 / 1.5 - fp8:.1f} |")
                print(lin[-1], flush=True)
    report({"transform_prefill": rows}, lines + ([] if args.small_m else lin),
           "CUDA-graph µs per call (4 calls per graph, median of 5×20 replays)", args.out_json, args.out_md)


if __name__ == "__main__":
    main()
