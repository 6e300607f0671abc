"""Decode-step kernels on the GPU, against BF16 in the same run (CUDA-graph time per call,
weights cycled through more copies than L2 holds):

1. q/k/v (3 × 4096×4096) and gate/up (2 × 11008×4096) at M = 1, 4, 16: one GEMV per
   weight against the joined GEMV (`triton_decode.w4a8_gemv_joined`, one launch), and
   BF16 cuBLAS one GEMM per weight (as transformers runs them).
2. The decode transform + quantize at M = 1, 4, 16, K = 4096 (with the fused RMSNorm, as
   in front of q/k/v) and K = 11008 (with the fused SwiGLU, as in front of down_proj):
   tiles kernel in one and in three launches, rows kernel with 4 and 8 warps.
3. (--chains) Each decode linear group of a layer as the model runs it, transform then GEMV
   (`ops.transform_quantize`, `w4a8_gemv_joined`), with the GEMV launched plainly and with
   programmatic dependent launch (`kernels/dependent_launch.py`), and with one weight that
   stays in L2 (the bound a perfect prefetch could reach), against the group's BF16 GEMMs
   alone (the W4A4 chain also does the RMSNorm or SwiGLU it absorbs; BF16 gets those free);
   and the same group as one launch, the transform inside the GEMV (`triton_fused_decode`), with
   its default warps, the other choice (4 or 8), and with half the GEMV's default programs
   (`gemv_config` waves = 2: a program holds more registers than the GEMV alone). The column
   "as the model runs it" is the transform followed by `ops.w4a4_linear_joined`, whose dispatch
   the model uses: the joined dp4a GEMV up to ops.DECODE_GEMV_MAX_M tokens, above it the joined
   int8-MMA decode kernel (`w4a8_decode_joined`); the other two-launch columns always run the
   joined GEMV (those columns are blank above its 16 tokens). --no-one-launch skips the one-launch
   columns.

    PYTHONPATH=src python scripts/decode_kernels.py --out-json decode_kernels.json --out-md decode_kernels.md
"""
from __future__ import annotations

import argparse

import torch

from duquant.bench.kernels import _copies, _graph_bench, _orthogonal
from duquant.bench.output import report
from duquant.kernels import ops
from duquant.kernels import reference as ref
from duquant.kernels.norm import InputNorm
from duquant.kernels.triton_decode import GEMV_MAX_M, w4a8_gemv, w4a8_gemv_joined
from duquant.kernels.triton_fused_decode import default_warps, transform_gemv
from duquant.kernels.triton_row_transform import duquant_quantize_rows
from duquant.kernels.triton_transform import duquant_quantize
from duquant.kernels.weight import quantize_weight

GROUPS = {"q/k/v": ([4096, 4096, 4096], 4096), "gate/up": ([11008, 11008], 4096)}


def _emit(rows: list[dict], lines: list[str], row: dict, line: str, check: str) -> None:
    """Keep one measured row (JSON) and its table line, and print the line with its correctness check."""
    rows.append(row)
    lines.append(line)
    print(line, check, flush=True)


def _weights(ns: list[int], k: int):
    """BF16 weights [n, k] for each n of a group, and their 4-bit packed forms, in as many copies as
    it takes to cycle past L2 (a copy shares the scales and zero points, concatenated once)."""
    total_n = sum(ns)
    bf16 = [[(0.02 * torch.randn(n, k, device="cuda")).to(torch.bfloat16) for n in ns]
            for _ in range(_copies(total_n * k * 2))]
    base = [quantize_weight(w.float()) for w in bf16[0]]
    w4 = [base] + [[type(p)(p.packed.clone(), p.scale, p.zero, k) for p in base]
                   for _ in range(_copies(total_n * k // 2) - 1)]
    return bf16, w4, torch.cat([p.scale for p in base]), torch.cat([p.zero for p in base])


def _gemv_rows(ms: list[int]) -> tuple[list[dict], list[str]]:
    rows, lines = [], ["| group | M | BF16 µs (one GEMM each) | W4 one GEMV each µs | W4 joined GEMV µs | joined vs BF16 | "
                       "joined vs separate |", "|---|---|---|---|---|---|---|"]
    for name, (ns, k) in GROUPS.items():
        total_n = sum(ns)
        bf16, w4, scale, zero = _weights(ns, k)
        base = w4[0]
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
            _emit(rows, lines, {"group": name, "M": m, "bf16_us": t_bf16, "separate_us": t_sep, "joined_us": t_join,
                                "joined_vs_separate_rel_err": err,
                                "joined_weight_TBps": total_n * k / 2 / t_join / 1e6},
                  f"| {name} | {m} | {t_bf16:.1f} | {t_sep:.1f} | {t_join:.1f} | **{t_bf16 / t_join:.2f}×** | "
                  f"{t_sep / t_join:.2f}× |", f"(rel. err joined vs separate {err:.1e})")
        del bf16, w4
        torch.cuda.empty_cache()
    return rows, lines


def _factors(k: int, op: str | None):
    """Random bf16 block rotations (128), a permutation and, in front of q/k/v or gate/up, an RMSNorm."""
    r1, r2 = _orthogonal(128, "cuda").to(torch.bfloat16), _orthogonal(128, "cuda").to(torch.bfloat16)
    norm = InputNorm(torch.rand(k, device="cuda").to(torch.bfloat16) + 0.5, 1e-5) if op == "RMSNorm" else None
    return r1, r2, torch.randperm(k, device="cuda"), norm


def _activations(m: int, k: int, op: str | None):
    """x [m, k] and, in front of down_proj (SwiGLU), the up projection."""
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    return x, torch.randn(m, k, device="cuda").to(torch.bfloat16) if op == "SwiGLU" else None


def _transform_rows(ms: list[int]) -> tuple[list[dict], list[str]]:
    rows, lines = [], ["| K | fused op | M | tiles one launch µs | tiles three launches µs | rows 4 warps µs | "
                       "rows 8 warps µs |", "|---|---|---|---|---|---|---|"]
    for k, op in ((4096, "RMSNorm"), (11008, "SwiGLU")):
        r1, r2, perm, norm = _factors(k, op)
        for m in ms:
            x, up = _activations(m, k, op)
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
            _emit(rows, lines, {"K": k, "op": op, "M": m, **{f"{n}_us": t for n, t in times.items()},
                                "rows_vs_tiles_code_flips": flips,
                                "rows_vs_tiles_scale_rel": float(((s_r - s_t).abs() / s_t).max())},
                  f"| {k} | {op} | {m} | " + " | ".join(f"{t:.1f}" for t in times.values()) + " |",
                  f"(rows vs tiles: {flips:.1e} of codes differ)")
    return rows, lines


# (name, output rows of the joined weights, K, op the transform absorbs)
CHAINS = [("q/k/v", [4096, 4096, 4096], 4096, "RMSNorm"), ("o", [4096], 4096, None),
          ("gate/up", [11008, 11008], 4096, "RMSNorm"), ("down", [4096], 11008, "SwiGLU")]


def _chain_rows(ms: list[int], one_launch_columns: bool = True) -> tuple[list[dict], list[str]]:
    rows, lines = [], ["| group | M | BF16 GEMMs µs | transform + GEMV µs | + PDL µs | weight in L2 µs | "
                       "one launch µs | one launch, other warps µs | one launch, GEMV waves = 2 µs | "
                       "two launches vs BF16 | **one launch vs BF16** | as the model runs it µs | "
                       "**as the model runs it vs BF16** |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, ns, k, op in CHAINS:
        bf16, weights, scale, zero = _weights(ns, k)
        base = weights[0]
        w4 = [[p.packed for p in ps] for ps in weights]
        r1, r2, perm, norm = _factors(k, op)
        for m in ms:
            x, up = _activations(m, k, op)

            def chain(packed, pdl, codes=False):
                a, s = ops.transform_quantize(x, r1, perm, r2, None, out_dtype=torch.int8, norm=norm, up=up)
                y = w4a8_gemv_joined(a, s, packed, scale, zero, pdl=pdl)
                return (a, s, y) if codes else y

            def as_the_model(ws):
                a, s = ops.transform_quantize(x, r1, perm, r2, None, out_dtype=ops.act_dtype(m), norm=norm, up=up)
                return ops.w4a4_linear_joined(a, s, ws, scale, zero)

            def one_launch(packed, **tune):
                return transform_gemv(x, r1, perm, r2, None, packed, scale, zero, norm=norm, up=up, **tune)

            gemv = m <= GEMV_MAX_M  # the joined-GEMV columns (and one launch) exist up to its limit
            if gemv:
                a, s, y = chain(w4[0], True, codes=True)  # a wrong chain must not look fast
            else:
                a, s = ops.transform_quantize(x, r1, perm, r2, None, out_dtype=torch.int8, norm=norm, up=up)
            y_ref = torch.cat([ref.w4a4_linear_ref(a, s, p) for p in base], dim=1).float()
            err = float((y.float() - y_ref).norm() / y_ref.norm()) if gemv else None
            y_model = as_the_model(base).float()
            err_model = float((y_model - y_ref).norm() / y_ref.norm())
            one_launch_columns_here = one_launch_columns and gemv
            err_one = float((one_launch(w4[0]).float() - y_ref).norm() / y_ref.norm()) if one_launch_columns_here else None
            warps = default_warps(k, 128, m)
            other = 8 if warps == 4 else 4
            t_bf16 = _graph_bench([lambda ws=ws, w=w: x @ w.T for ws in bf16 for w in ws]) * len(ns)
            t_plain = t_pdl = t_hot = t_one = t_other = t_waves = float("nan")
            if gemv:
                t_plain = _graph_bench([lambda p=p: chain(p, False) for p in w4])
                t_pdl = _graph_bench([lambda p=p: chain(p, True) for p in w4])
                t_hot = _graph_bench([lambda w=w4[0]: chain(w, False)] * 8)  # one weight: L2-resident after the first call
            t_model = _graph_bench([lambda ws=ws: as_the_model(ws) for ws in weights])
            if one_launch_columns_here:
                t_one = _graph_bench([lambda p=p: one_launch(p) for p in w4])
                t_other = _graph_bench([lambda p=p: one_launch(p, warps=other) for p in w4])
                t_waves = _graph_bench([lambda p=p: one_launch(p, waves=2) for p in w4])
            _emit(rows, lines, {"group": name, "M": m, "K": k, "fused_op": op, "bf16_us": t_bf16, "chain_us": t_plain,
                                "chain_pdl_us": t_pdl, "chain_hot_l2_us": t_hot, "one_launch_us": t_one,
                                "one_launch_warps": warps, "one_launch_other_warps_us": t_other,
                                "other_warps": other, "one_launch_waves2_us": t_waves, "model_path_us": t_model,
                                "pdl_rel_err_vs_reference": err, "one_launch_rel_err_vs_reference": err_one,
                                "model_path_rel_err_vs_reference": err_model},
                  f"| {name} | {m} | {t_bf16:.1f} | {t_plain:.1f} | {t_pdl:.1f} | {t_hot:.1f} | {t_one:.1f} | "
                  f"{t_other:.1f} ({other} warps) | {t_waves:.1f} | {t_bf16 / t_plain:.2f}× | **{t_bf16 / t_one:.2f}×** | "
                  f"{t_model:.1f} | **{t_bf16 / t_model:.2f}×** |",
                  f"(rel. err vs reference: PDL chain {err}, one launch {err_one}, as the model {err_model:.1e})")
        del bf16, w4
        torch.cuda.empty_cache()
    return rows, lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    p.add_argument("--chains", action="store_true", help="only the transform → GEMV chains (part 3)")
    p.add_argument("--no-one-launch", action="store_true", help="chains: skip the one-launch columns")
    args = p.parse_args()
    torch.manual_seed(0)
    description = "CUDA-graph time per call (per group for the GEMVs), weights cycled past L2"
    if args.chains:
        chains, chain_lines = _chain_rows(args.ms, not args.no_one_launch)
        report({"chains": chains}, chain_lines, description, args.out_json, args.out_md)
        return
    gemv, gemv_lines = _gemv_rows(args.ms)
    transform, transform_lines = _transform_rows(args.ms)
    report({"gemv": gemv, "transform": transform}, gemv_lines + [""] + transform_lines, description,
           args.out_json, args.out_md)


if __name__ == "__main__":
    main()
