"""Decode-step kernels on the GPU, against BF16 in the same run (CUDA-graph time per call,
weights cycled through more copies than L2 holds):

1. q/k/v (3 × 4096×4096) and gate/up (2 × 11008×4096) at M = 1, 4, 16: one GEMV per
   weight against the joined GEMV (`triton_decode.w4a8_gemv_joined`, one launch), and
   BF16 cuBLAS one GEMM per weight (as transformers runs them).
2. The decode transform + quantize at M = 1, 4, 16, K = 4096 (with the fused RMSNorm, as
   in front of q/k/v) and K = 11008 (with the fused SwiGLU, as in front of down_proj):
   tiles kernel in one and in three launches, rows kernel with 4 and 8 warps.

    PYTHONPATH=src python scripts/decode_kernels.py --out-json decode_kernels.json --out-md decode_kernels.md
"""
from __future__ import annotations

import argparse

import torch

from duquant.bench.kernels import _copies, _graph_bench, _orthogonal
from duquant.bench.output import write_results
from duquant.kernels.norm import InputNorm
from duquant.kernels.triton_decode import w4a8_gemv, w4a8_gemv_joined
from duquant.kernels.triton_row_transform import duquant_quantize_rows
from duquant.kernels.triton_transform import duquant_quantize
from duquant.kernels.weight import quantize_weight

GROUPS = {"q/k/v": ([4096, 4096, 4096], 4096), "gate/up": ([11008, 11008], 4096)}


def _gemv_rows(ms: list[int]) -> tuple[list[dict], list[str]]:
    rows, lines = [], ["| group | M | BF16 µs (one GEMM each) | W4 one GEMV each µs | W4 joined GEMV µs | joined vs BF16 | "
                       "joined vs separate |", "|---|---|---|---|---|---|---|"]
    for name, (ns, k) in GROUPS.items():
        total_n = sum(ns)
        bf16_copies = _copies(total_n * k * 2)
        w4_copies = _copies(total_n * k // 2)
        bf16 = [[(0.02 * torch.randn(n, k, device="cuda")).to(torch.bfloat16) for n in ns] for _ in range(bf16_copies)]
        base = [quantize_weight(w.float()) for w in bf16[0]]
        w4 = [base] + [[type(p)(p.packed.clone(), p.scale, p.zero, k) for p in base] for _ in range(w4_copies - 1)]
        scale, zero = torch.cat([p.scale for p in base]), torch.cat([p.zero for p in base])
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            a = torch.randint(-15, 16, (m, k), device="cuda", dtype=torch.int8)
            s = torch.rand(m, device="cuda") + 0.05
            y_sep = torch.cat([w4a8_gemv(a, s, p.packed, p.scale, p.zero).float() for p in base], dim=1)
            y_join = w4a8_gemv_joined(a, s, [p.packed for p in base], scale, zero).float()
            err = float((y_join - y_sep).norm() / y_sep.norm())  # a wrong kernel must not look fast
            t_bf16 = _graph_bench([lambda ws=ws, w=w: x @ w.T for ws in bf16 for w in ws]) * len(ns)
            t_sep = _graph_bench([lambda p=p: w4a8_gemv(a, s, p.packed, p.scale, p.zero) for ps in w4 for p in ps]) * len(ns)
            t_join = _graph_bench([lambda ps=ps: w4a8_gemv_joined(a, s, [p.packed for p in ps], scale, zero) for ps in w4])
            r = {"group": name, "M": m, "bf16_us": t_bf16, "separate_us": t_sep, "joined_us": t_join,
                 "joined_vs_separate_rel_err": err, "joined_weight_TBps": total_n * k / 2 / t_join / 1e6}
            rows.append(r)
            lines.append(f"| {name} | {m} | {t_bf16:.1f} | {t_sep:.1f} | {t_join:.1f} | **{t_bf16 / t_join:.2f}×** | "
                         f"{t_sep / t_join:.2f}× |")
            print(lines[-1], f"(rel. err joined vs separate {err:.1e})", flush=True)
        del bf16, w4
        torch.cuda.empty_cache()
    return rows, lines


def _transform_rows(ms: list[int]) -> tuple[list[dict], list[str]]:
    rows, lines = [], ["| K | fused op | M | tiles one launch µs | tiles three launches µs | rows 4 warps µs | "
                       "rows 8 warps µs |", "|---|---|---|---|---|---|---|"]
    for k, op in ((4096, "RMSNorm"), (11008, "SwiGLU")):
        r1, r2 = _orthogonal(128, "cuda").to(torch.bfloat16), _orthogonal(128, "cuda").to(torch.bfloat16)
        perm = torch.randperm(k, device="cuda")
        norm = InputNorm(torch.rand(k, device="cuda").to(torch.bfloat16) + 0.5, 1e-5) if op == "RMSNorm" else None
        for m in ms:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            up = torch.randn(m, k, device="cuda").to(torch.bfloat16) if op == "SwiGLU" else None
            kw = dict(out_dtype=torch.int8, norm=norm, up=up)
            a_t, s_t = duquant_quantize(x, r1, perm, r2, None, fused=False, **kw)
            a_r, s_r = duquant_quantize_rows(x, r1, perm, r2, None, **kw)
            flips = float((a_t.to(torch.int16) - a_r.to(torch.int16)).abs().gt(0).float().mean())
            times = {
                "tiles_one": _graph_bench([lambda: duquant_quantize(x, r1, perm, r2, None, fused=True, **kw)] * 8),
                "tiles_three": _graph_bench([lambda: duquant_quantize(x, r1, perm, r2, None, fused=False, **kw)] * 8),
                "rows_w4": _graph_bench([lambda: duquant_quantize_rows(x, r1, perm, r2, None, warps=4, **kw)] * 8),
                "rows_w8": _graph_bench([lambda: duquant_quantize_rows(x, r1, perm, r2, None, warps=8, **kw)] * 8),
            }
            rows.append({"K": k, "op": op, "M": m, **{f"{n}_us": t for n, t in times.items()},
                         "rows_vs_tiles_code_flips": flips,
                         "rows_vs_tiles_scale_rel": float(((s_r - s_t).abs() / s_t).max())})
            lines.append(f"| {k} | {op} | {m} | " + " | ".join(f"{t:.1f}" for t in times.values()) + " |")
            print(lines[-1], f"(rows vs tiles: {flips:.1e} of codes differ)", flush=True)
    return rows, lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    gemv, gemv_lines = _gemv_rows(args.ms)
    transform, transform_lines = _transform_rows(args.ms)
    import triton
    md = (f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          "CUDA-graph time per call (per group for the GEMVs)\n\n" + "\n".join(gemv_lines) + "\n\n"
          + "\n".join(transform_lines) + "\n")
    print(md)
    write_results({"gemv": gemv, "transform": transform}, md, args.out_json, args.out_md)


if __name__ == "__main__":
    main()
