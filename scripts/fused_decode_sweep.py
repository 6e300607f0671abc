"""Sweep of the one-launch decode linear (`triton_fused_decode`, the transform inside the GEMV)
against the two launches (rows transform, then the joined GEMV), CUDA-graph time per call with
the weights cycled past L2, BF16 in the same run. Knobs of the waiting GEMV programs: whether
they load their first weight tile before waiting (preload), how long they sleep between polls
of the flag (backoff, ns), how many programs the GEMV has (`gemv_config` waves per SM), and a cap
on registers per thread (the transform half needs ~135 at K = 4096, the GEMV alone 72 at M = 1:
the launch's occupancy is the transform's unless capped).

    PYTHONPATH=src python scripts/fused_decode_sweep.py --out-json sweep.json --out-md sweep.md
"""
from __future__ import annotations

import argparse
import itertools

import torch
from decode_kernels import CHAINS, _activations, _factors, _weights

from duquant.bench.kernels import _graph_bench
from duquant.bench.output import report
from duquant.kernels import reference as ref
from duquant.kernels.triton_decode import w4a8_gemv_joined
from duquant.kernels.triton_fused_decode import transform_gemv
from duquant.kernels.triton_row_transform import duquant_quantize_rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", type=int, nargs="*", default=[1, 4])
    p.add_argument("--groups", nargs="*", default=["o", "q/k/v", "gate/up", "down"])
    p.add_argument("--backoffs", type=int, nargs="*", default=[0, 200, 1000])
    p.add_argument("--waves", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--preloads", type=int, nargs="*", default=[1, 0])
    p.add_argument("--max-regs", type=int, nargs="*", default=[0], help="registers per thread (0: the compiler's choice)")
    p.add_argument("--gemv-only", action="store_true",
                   help="also time the one-launch kernel with no transform programs (the GEMV half alone, on "
                        "stale codes): its cost against the GEMV kernel alone")
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    rows, lines = [], ["| group | M | BF16 µs | two launches µs | best one launch µs (preload, backoff ns, waves, max regs) | "
                       "worst one launch µs | best one launch vs BF16 |", "|---|---|---|---|---|---|---|"]
    for name, ns, k, op in CHAINS:
        if name not in args.groups:
            continue
        bf16, weights, scale, zero = _weights(ns, k)
        w4 = [[q.packed for q in ps] for ps in weights]
        r1, r2, perm, norm = _factors(k, op)
        for m in args.ms:
            x, up = _activations(m, k, op)

            def two(packed):
                a, s = duquant_quantize_rows(x, r1, perm, r2, None, norm=norm, up=up)
                return w4a8_gemv_joined(a, s, packed, scale, zero)

            a, s = duquant_quantize_rows(x, r1, perm, r2, None, norm=norm, up=up)
            y_ref = torch.cat([ref.w4a4_linear_ref(a, s, q) for q in weights[0]], dim=1).float()
            t_bf16 = _graph_bench([lambda ws=ws, w=w: x @ w.T for ws in bf16 for w in ws]) * len(ns)
            t_two = _graph_bench([lambda q=q: two(q) for q in w4])
            variants = {}
            if args.gemv_only:
                t_gemv = _graph_bench([lambda q=q: w4a8_gemv_joined(a, s, q, scale, zero) for q in w4])
                t_half = _graph_bench([lambda q=q: transform_gemv(x, r1, perm, r2, None, q, scale, zero, norm=norm, up=up,
                                                                  skip_transform=True) for q in w4])
                t_rows = _graph_bench([lambda: duquant_quantize_rows(x, r1, perm, r2, None, norm=norm, up=up)] * 8)
                rows.append({"group": name, "M": m, "gemv_alone_us": t_gemv, "one_launch_gemv_half_us": t_half,
                             "rows_transform_us": t_rows})
                print(name, m, f"GEMV alone {t_gemv:.1f} µs, one-launch kernel without its transform {t_half:.1f} µs, "
                      f"rows transform alone {t_rows:.1f} µs", flush=True)
            for preload, backoff, waves, regs in itertools.product(args.preloads, args.backoffs, args.waves,
                                                                   args.max_regs):
                kw = dict(norm=norm, up=up, preload=bool(preload), backoff_ns=backoff, waves=waves, max_regs=regs or None)
                y = transform_gemv(x, r1, perm, r2, None, w4[0], scale, zero, **kw).float()
                err = float((y - y_ref).norm() / y_ref.norm())  # a wrong variant must not look fast
                t = _graph_bench([lambda q=q, kw=kw: transform_gemv(x, r1, perm, r2, None, q, scale, zero, **kw)
                                  for q in w4])
                variants[(preload, backoff, waves, regs)] = t
                rows.append({"group": name, "M": m, "preload": preload, "backoff_ns": backoff, "waves": waves,
                             "max_regs": regs, "one_launch_us": t, "rel_err_vs_reference": err})
                print(name, m, preload, backoff, waves, regs, f"{t:.1f} µs (two launches {t_two:.1f}, BF16 {t_bf16:.1f}); "
                      f"rel. err {err:.1e}", flush=True)
            best = min(variants, key=variants.get)
            rows.append({"group": name, "M": m, "bf16_us": t_bf16, "two_launches_us": t_two})
            lines.append(f"| {name} | {m} | {t_bf16:.1f} | {t_two:.1f} | {variants[best]:.1f} {best} | "
                         f"{max(variants.values()):.1f} | **{t_bf16 / variants[best]:.2f}×** |")
            print(lines[-1], flush=True)
        del bf16, w4
        torch.cuda.empty_cache()
    report({"sweep": rows}, lines, "CUDA-graph µs per call, weights cycled past L2; one launch = triton_fused_decode",
           args.out_json, args.out_md)


if __name__ == "__main__":
    main()
