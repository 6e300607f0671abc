"""Kernel benchmark: W4A4 linear (online transform + quantize + 8-bit GEMM over 4-bit
weights) against BF16 cuBLAS `x @ w.T`, measured in the same run, at LLaMA-2-7B shapes.

Prefill sizes (M > 64) are timed with `triton.testing.do_bench` (median; it flushes L2
before every repetition, so weights and activations come from HBM). Decode sizes are
timed as CUDA-graph replays of back-to-back calls over several weight copies (more
bytes than L2 holds), so each call reads its weight from HBM with no launch gaps.

    python -m duquant.bench.kernels --out-json results/kernels/kernels.json \
        --out-md results/kernels/kernels.md
"""
from __future__ import annotations

import math
import statistics
from typing import Callable

import torch

from ..cuda_graphs import capture
from ..kernels import ops
from .output import write_results

# LLaMA-2-7B linear shapes (N, K): q/k/v/o, gate/up, down.
LLAMA2_7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
DEFAULT_MS = [1, 4, 16, 64, 2048, 8192, 32768]
_L2_DEFEAT_BYTES = 160 << 20  # weights cycled per graph replay: > 3× the H100's 50 MB L2


def _orthogonal(n: int, device: str) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, device=device, dtype=torch.float64))
    return q.float().contiguous()


def _bench(fn: Callable[[], object]) -> float:
    """Median microseconds per call, cold L2 (do_bench flushes it before every repetition)."""
    import triton.testing
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def _graph_bench(calls: list[Callable[[], object]], replays: int = 20, trials: int = 5) -> float:
    """Median microseconds per call of a CUDA graph holding `calls` back to back."""
    graph, _ = capture(lambda: [c() for c in calls], 2)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(1e3 * start.elapsed_time(end) / (replays * len(calls)))
    del graph
    return statistics.median(times)


def _copies(nbytes: int) -> int:
    return max(2, min(24, math.ceil(_L2_DEFEAT_BYTES / max(nbytes, 1))))


def measure_ceilings(device: str = "cuda") -> dict[str, float]:
    """Device-copy bandwidth (read + write) and BF16 dense GEMM rate, measured here."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_copy = _bench(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t_mm = _bench(lambda: a @ b)
    return {"copy_TBps": 2 * src.numel() / t_copy / 1e6, "bf16_TFLOPs": 2 * 8192**3 / t_mm / 1e6}


def _bench_prefill(m: int, n: int, k: int, device: str) -> dict[str, float]:
    from duquant.kernels.triton_gemm import expand_w4, fp8_gemm, int8_gemm
    from duquant.kernels.triton_hadamard import hadamard_quantize
    from duquant.kernels.triton_row_transform import duquant_quantize_rows
    from duquant.kernels.triton_transform import duquant_quantize
    from duquant.kernels.weight import quantize_weight
    blk = 128 if k % 128 == 0 else 64
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    w = (0.02 * torch.randn(n, k, device=device)).to(torch.bfloat16)
    pw = quantize_weight(w.float(), prefill="int8")
    w_fp8 = pw.w8.to(torch.float32).to(torch.float8_e4m3fn)
    rot1, rot2, perm = _orthogonal(blk, device), _orthogonal(blk, device), torch.randperm(k, device=device)
    r1, r2 = rot1.to(torch.bfloat16), rot2.to(torch.bfloat16)
    smooth = None  # a quantized model folds its smoothing into the producers (methods/apply.py)
    had_m = _had_m(k, device)

    def transform(dtype):  # the kernel the model's linear runs (ops picks tiles or rows)
        return ops.transform_quantize(x, r1, perm, r2, smooth, out_dtype=dtype)

    a8, s8 = transform(torch.int8)
    af, sf = transform(torch.float8_e4m3fn)
    r = {}
    r["bf16"] = _bench(lambda: x @ w.T)
    if m == 2048:  # tile sweep of the v2 transform (recorded; the default is used below)
        for bm in (32, 64, 128):
            for wp in (4, 8):
                r[f"transform_bm{bm}_w{wp}_graph"] = _graph_bench([
                    lambda bm=bm, wp=wp: duquant_quantize(x, r1, perm, r2, smooth, out_dtype=torch.float8_e4m3fn,
                                                          block_m=bm, warps=wp)] * 4)
        r["transform_3launch_graph"] = _graph_bench([lambda: duquant_quantize(
            x, r1, perm, r2, smooth, out_dtype=torch.float8_e4m3fn, fused=False)] * 4)
        r["transform_3launch"] = _bench(lambda: duquant_quantize(x, r1, perm, r2, smooth, out_dtype=torch.float8_e4m3fn,
                                                                 fused=False))
    r["transform_rows_graph"] = _graph_bench([lambda: duquant_quantize_rows(
        x, r1, perm, r2, smooth, out_dtype=torch.float8_e4m3fn)] * 4)
    r["transform_rows"] = _bench(lambda: duquant_quantize_rows(x, r1, perm, r2, smooth, out_dtype=torch.float8_e4m3fn))
    r["transform_int8"] = _bench(lambda: transform(torch.int8))
    r["transform_fp8"] = _bench(lambda: transform(torch.float8_e4m3fn))
    r["transform_tiles_graph"] = _graph_bench([lambda: duquant_quantize(x, r1, perm, r2, smooth,
                                                                        out_dtype=torch.float8_e4m3fn)] * 4)
    r["transform_noperm"] = _bench(lambda: duquant_quantize(x, r1, None, r2, smooth, out_dtype=torch.float8_e4m3fn))
    r["hadamard_fp8"] = _bench(lambda: hadamard_quantize(x, had_m, out_dtype=torch.float8_e4m3fn))
    if m == 2048:
        r["transform_precise"] = _bench(lambda: duquant_quantize(x, rot1, perm, rot2, smooth, out_dtype=torch.float8_e4m3fn,
                                                                 precise=True))
        r["expand_w4"] = _bench(lambda: expand_w4(pw.packed, pw.zero, torch.float8_e4m3fn))
        r["gemm_fp8_fastaccum"] = _bench(lambda: fp8_gemm(af, sf, w_fp8, pw.scale, fast_accum=True))
    # Under CUDA graphs (no host launch overhead; inputs stay in L2 where they fit, so
    # these are GPU-time lower bounds): separates the Triton launch cost from the kernels.
    r["bf16_graph"] = _graph_bench([lambda: x @ w.T] * 4)
    r["transform_fp8_graph"] = _graph_bench([lambda: transform(torch.float8_e4m3fn)] * 4)
    r["hadamard_fp8_graph"] = _graph_bench([lambda: hadamard_quantize(x, had_m, out_dtype=torch.float8_e4m3fn)] * 4)
    r["total_fp8_graph"] = _graph_bench([lambda: fp8_gemm(*transform(torch.float8_e4m3fn), w_fp8, pw.scale)] * 4)
    r["gemm_int8"] = _bench(lambda: int8_gemm(a8, s8, pw.w8, pw.scale))
    r["gemm_fp8"] = _bench(lambda: fp8_gemm(af, sf, w_fp8, pw.scale))
    r["total_int8"] = _bench(lambda: int8_gemm(*transform(torch.int8), pw.w8, pw.scale))
    r["total_fp8"] = _bench(lambda: fp8_gemm(*transform(torch.float8_e4m3fn), w_fp8, pw.scale))
    r["total_hadamard_fp8"] = _bench(lambda: fp8_gemm(*hadamard_quantize(x, had_m, out_dtype=torch.float8_e4m3fn),
                                                      w_fp8, pw.scale))
    return r


# (BLOCK_N, BLOCK_K, programs per SM, warps, stages) tried for the decode GEMM.
DECODE_SWEEP = [(64, 512, 4, 4, 3), (32, 512, 4, 4, 3), (128, 512, 2, 4, 3), (64, 256, 4, 4, 4),
                (32, 1024, 4, 4, 2), (128, 256, 4, 8, 3), (16, 512, 8, 4, 3), (64, 1024, 2, 8, 2)]
# The same for the dp4a GEMV (M ≤ GEMV_MAX_M; keys gemv_*). Configs whose int32 accumulators
# would exceed 64 registers per thread at this M are skipped (they spill).
GEMV_SWEEP = [(32, 1024, 4, 4, 3), (16, 1024, 8, 4, 3), (64, 512, 4, 4, 3), (32, 512, 8, 8, 3),
              (32, 1024, 2, 8, 4), (64, 1024, 4, 8, 2), (16, 512, 16, 4, 1), (128, 256, 4, 4, 3)]


def _had_m(k: int, device: str) -> torch.Tensor | None:
    """The real base factor H_m of `duquant.transforms.hadamard` for K = m·2^j (None: m = 1)."""
    from duquant.transforms.hadamard import _base_matrix, _decompose
    mm, _ = _decompose(k)
    return None if mm == 1 else _base_matrix(mm).to(device, torch.float32)


def _sweep(r: dict, prefix: str, kernel, sweep, a, s, pws, fits=None) -> tuple[float, dict]:
    """Time `kernel` at every (BLOCK_N, BLOCK_K, programs per SM, warps, stages) of `sweep`
    (CUDA graph over the weight copies `pws`), record each under r[prefix_...], and return
    the best time and its tuning. Configs that do not compile (registers, smem) are skipped."""
    best, best_cfg = float("inf"), {}
    for bn, bk, waves, nw, ns in sweep:
        if fits is not None and not fits(bn, bk, nw):
            continue
        tune = dict(block_n=bn, block_k=bk, waves=waves, num_warps=nw, num_stages=ns)
        try:
            t = _graph_bench([lambda p=p, tune=tune: kernel(a, s, p.packed, p.scale, p.zero, **tune) for p in pws])
        except Exception as e:  # noqa: BLE001
            print(f"{prefix} config {tune} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        r[f"{prefix}_n{bn}_k{bk}_w{waves}_{nw}x{ns}"] = t
        if t < best:
            best, best_cfg = t, tune
    return best, best_cfg


def _bench_decode(m: int, n: int, k: int, device: str) -> dict[str, float]:
    from duquant.kernels.triton_decode import GEMV_MAX_M, w4a8_decode, w4a8_gemv
    from duquant.kernels.triton_hadamard import hadamard_quantize
    from duquant.kernels.triton_row_transform import duquant_quantize_rows
    from duquant.kernels.triton_transform import duquant_quantize
    from duquant.kernels.weight import quantize_weight
    blk = 128 if k % 128 == 0 else 64
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    rot1, rot2 = _orthogonal(blk, device).to(torch.bfloat16), _orthogonal(blk, device).to(torch.bfloat16)
    perm, smooth = torch.randperm(k, device=device), torch.rand(k, device=device) + 0.5
    had_m = _had_m(k, device)
    n_bf16 = _copies(n * k * 2)
    n_w4 = _copies(n * k // 2)
    ws = [(0.02 * torch.randn(n, k, device=device)).to(torch.bfloat16) for _ in range(n_bf16)]
    pw0 = quantize_weight(ws[0].float())
    pws = [pw0] + [type(pw0)(pw0.packed.clone(), pw0.scale.clone(), pw0.zero.clone(), k) for _ in range(n_w4 - 1)]
    a, s = duquant_quantize(x, rot1, perm, rot2, smooth)
    r = {}
    r["bf16"] = _graph_bench([lambda w=w: x @ w.T for w in ws])
    r["transform_int8"] = _graph_bench([lambda: duquant_quantize(x, rot1, perm, rot2, smooth)] * 8)
    r["transform_rows_int8"] = _graph_bench([lambda: duquant_quantize_rows(x, rot1, perm, rot2, smooth)] * 8)
    best, best_cfg = _sweep(r, "decode", w4a8_decode, DECODE_SWEEP, a, s, pws)
    r["gemm_decode_default"] = _graph_bench([lambda p=p: w4a8_decode(a, s, p.packed, p.scale, p.zero) for p in pws])
    if r["gemm_decode_default"] <= best:
        best, best_cfg = r["gemm_decode_default"], {}
    r["gemm_decode_mma"] = best
    kernel, kernel_cfg = w4a8_decode, best_cfg
    if m <= GEMV_MAX_M:
        import triton
        y_mma = w4a8_decode(a, s, pw0.packed, pw0.scale, pw0.zero).float()
        y_gemv = w4a8_gemv(a, s, pw0.packed, pw0.scale, pw0.zero).float()
        r["gemv_vs_mma_rel_err"] = float((y_gemv - y_mma).norm() / y_mma.norm())  # a wrong kernel must not look fast
        fits = lambda bn, bk, nw: triton.next_power_of_2(m) * bn * (bk // 32) <= 64 * 32 * nw  # noqa: E731 - ≤ 64 acc regs
        g_best, g_cfg = _sweep(r, "gemv", w4a8_gemv, GEMV_SWEEP, a, s, pws, fits)
        r["gemv_default"] = _graph_bench([lambda p=p: w4a8_gemv(a, s, p.packed, p.scale, p.zero) for p in pws])
        if r["gemv_default"] <= g_best:
            g_best, g_cfg = r["gemv_default"], {}
        r["gemm_decode_gemv"] = g_best
        r["gemv_weight_TBps"] = n * k / 2 / g_best / 1e6  # packed bytes per µs → TB/s
        if g_best < best:
            kernel, kernel_cfg = w4a8_gemv, g_cfg
    r["gemm_decode"] = min(r["gemm_decode_mma"], r.get("gemm_decode_gemv", float("inf")))
    r["total_decode"] = _graph_bench([lambda p=p: kernel(*duquant_quantize(x, rot1, perm, rot2, smooth), p.packed,
                                                         p.scale, p.zero, **kernel_cfg) for p in pws])
    r["hadamard_int8"] = _graph_bench([lambda: hadamard_quantize(x, had_m, out_dtype=torch.int8)] * 8)
    return r


def _row(n: int, k: int, m: int, r: dict[str, float]) -> dict[str, object]:
    if m <= ops.DECODE_MAX_M:
        total, transform, gemm = r["total_decode"], r["transform_int8"], r["gemm_decode"]
        gemv = r.get("gemm_decode_gemv", float("inf")) < r["gemm_decode_mma"]
        path = "decode W4 (dp4a GEMV)" if gemv else "decode W4 (int8 MMA)"
    else:
        path = "fp8" if r["total_fp8"] <= r["total_int8"] else "int8"
        total, transform, gemm = r[f"total_{path}"], r[f"transform_{path}"], r[f"gemm_{path}"]
        path = {"fp8": "FP8 _scaled_mm", "int8": "INT8 Triton"}[path]
    flops = 2 * m * n * k
    extra = {}
    if "total_fp8_graph" in r:
        extra = {"graph_speedup": r["bf16_graph"] / r["total_fp8_graph"],
                 "transform_graph_us": r["transform_fp8_graph"]}
    return {**extra, "N": n, "K": k, "M": m, "path": path, "bf16_us": r["bf16"], "transform_us": transform, "gemm_us": gemm,
            "w4a4_total_us": total, "speedup": r["bf16"] / total, "gemm_only_speedup": r["bf16"] / gemm,
            "bf16_TFLOPs": flops / r["bf16"] / 1e6, "w4a4_TOPs": flops / total / 1e6, "all_us": r}


def markdown(rows: list[dict[str, object]], meta: dict[str, object]) -> str:
    lines = [f"GPU: {meta['gpu']}; torch {meta['torch']}, triton {meta['triton']}; measured ceilings: "
             f"copy {meta['ceilings']['copy_TBps']:.2f} TB/s, BF16 GEMM {meta['ceilings']['bf16_TFLOPs']:.0f} TFLOP/s",
             "", "Eager columns: one call per timing (`triton.testing.do_bench`, L2 flushed), so a kernel "
             "whose host code outlasts the flush is timed with its launch overhead. Graph columns (prefill "
             "sizes): GPU time per call in a CUDA-graph replay of 4 calls, FP8 path, BF16 timed the same way.",
             "", "| N×K | M | path | BF16 µs | transform+quant µs | GEMM µs | W4A4 total µs | speedup | GEMM-only speedup "
             "| graph: BF16 µs | graph: transform µs | graph: W4A4 total µs | graph speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        graph = "| — | — | — | — |"
        if "graph_speedup" in r:
            us = r["all_us"]
            graph = (f"| {us['bf16_graph']:.1f} | {us['transform_fp8_graph']:.1f} | {us['total_fp8_graph']:.1f} "
                     f"| **{r['graph_speedup']:.2f}×** |")
        lines.append(f"| {r['N']}×{r['K']} | {r['M']} | {r['path']} | {r['bf16_us']:.1f} | {r['transform_us']:.1f} | "
                     f"{r['gemm_us']:.1f} | {r['w4a4_total_us']:.1f} | **{r['speedup']:.2f}×** | "
                     f"{r['gemm_only_speedup']:.2f}× {graph}")
    lines += ["", "Other variants (µs):", ""]
    for r in rows:
        extra = ", ".join(f"{k} {v:.1f}" for k, v in r["all_us"].items())
        lines.append(f"- {r['N']}×{r['K']} M={r['M']}: {extra}")
    return "\n".join(lines) + "\n"


def run_kernel_bench(shapes: list[tuple[int, int]] | None = None, ms: list[int] | None = None,
                     out_json: str | None = None, out_md: str | None = None) -> list[dict[str, object]]:
    """Time every (N, K) × M; print a markdown table; write JSON/markdown if paths are given."""
    import triton
    shapes, ms = shapes or LLAMA2_7B_SHAPES, ms or DEFAULT_MS
    torch.manual_seed(0)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "ceilings": measure_ceilings()}
    rows = []
    for n, k in shapes:
        for m in ms:
            r = _bench_decode(m, n, k, "cuda") if m <= ops.DECODE_MAX_M else _bench_prefill(m, n, k, "cuda")
            rows.append(_row(n, k, m, r))
            print(f"N={n} K={k} M={m}: " + ", ".join(f"{a} {b:.1f}" for a, b in r.items()), flush=True)
            torch.cuda.empty_cache()
            # partial results survive a timeout
            write_results({"meta": meta, "rows": rows, "partial": True}, "", out_json, None)
    md = markdown(rows, meta)
    print(md)
    write_results({"meta": meta, "rows": rows}, md, out_json, out_md)
    return rows


def main(argv: list[str] | None = None) -> int:
    from duquant.bench import main as bench_main
    return bench_main(["--level", "kernel", *(argv or [])])


if __name__ == "__main__":
    raise SystemExit(main())
