"""Quantization-runtime benchmark: how long `duquant.quantize` takes for DuQuant W4A4 on a
LLaMA-2-7B-shaped model with random weights.

The model (float16 on CUDA) is built with transformers' random initialisation; the
calibration set is `nsamples` × `seqlen` random token ids from a seeded generator (the
paper's setting is 128 × 2048 C4 tokens: the runtime depends on the shapes, not on the
text). The pipeline is the library's (layer by layer, `QuantConfig(method="duquant")`
defaults: W4A4, smoothing, two greedy rotations of 256 steps, zigzag permutation).

Reported: total seconds (the report's own clock), the report's stage_seconds, a finer
split by stage measured here by timing the pipeline's stage functions, the per-layer mean,
peak device memory, device and versions.
"""
from __future__ import annotations

import importlib
import time
from contextlib import contextmanager
from typing import Callable

import torch

from .layer import llama2_7b_config, random_llama, shape_label
from .output import write_results
from .timing import environment, environment_line, peak_memory_bytes, reset_peak_memory, synchronize

# The stage functions `duquant.quantize.quantize` calls, in its module namespace, and what each does.
STAGES = {
    "capture_layer0_inputs": "embed the calibration set, capture layer-0 inputs",
    "collect": "statistics: forward passes of the FP layer with hooks (abs-max, mean sequence)",
    "fit_groups": "fit transforms: smoothing, greedy rotations, permutation",
    "quantize_layer": "fold transforms into weights, round weights, install QuantLinears",
    "run_layer": "forward of the quantized layer (inputs of the next layer)",
}


def random_calibration(nsamples: int, seqlen: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


@contextmanager
def stage_timers(module, names: list[str], device: torch.device,
                 after: Callable[[str, dict[str, float]], None] | None = None):
    """Time calls of module-level functions `names` of `module` (restored on exit); yields
    {name: seconds so far}. `after(name, seconds)` runs after each timed call.

    The report of `quantize` lumps the statistics passes into "fit" and leaves weight
    rounding and the prefix forward out; wrapping the functions it calls gives the split
    without touching the pipeline. Each call synchronizes the device at entry and exit so
    its GPU work is counted in its own stage."""
    seconds = {name: 0.0 for name in names if callable(getattr(module, name, None))}
    originals = {name: getattr(module, name) for name in seconds}

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(device)
                seconds[name] += time.perf_counter() - start
                if after is not None:
                    after(name, seconds)
        return wrapper

    for name, fn in originals.items():
        setattr(module, name, timed(name, fn))
    try:
        yield seconds
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def _progress_writer(out_json: str | None, meta: dict, start: float) -> Callable[[str, dict[str, float]], None]:
    """Writes partial results after each decoder layer (one `run_layer` call per layer), so a
    run cut by a time limit still says how far it got and how long a layer takes."""
    done = {"layers": 0}

    def after(name: str, seconds: dict[str, float]) -> None:
        if name != "run_layer":
            return
        done["layers"] += 1
        write_results({"meta": meta, "partial": True, "layers_done": done["layers"],
                       "elapsed_s": time.perf_counter() - start, "stage_seconds_measured": dict(seconds)},
                      "", out_json, None)

    return after


def _non_default(meta: dict) -> str:
    """The calibration procedure, where it is not the reference one (a result's header must say)."""
    forward = meta.get("quant_config", {}).get("calib_forward", "simulated")
    return "" if forward == "simulated" else f", calib_forward=\"{forward}\""


def run_quantize_bench(layers: int = 32, nsamples: int = 128, seqlen: int = 2048, out_json: str | None = None,
                       out_md: str | None = None, *, device: str | torch.device = "cuda",
                       dtype: torch.dtype | None = None, config=None, seed: int = 0, progress: bool = True,
                       offload: bool | None = None, batch_size: int = 1, **quant_settings) -> dict:
    """Build the random model, quantize it with DuQuant, report the runtime.

    config: a LlamaConfig (default LLaMA-2-7B shapes with `layers` layers); dtype: default
    float16 on CUDA, float32 on the CPU; offload: keep calibration activations on the CPU
    (None: the pipeline decides; 128 × 2048 × 4096 fp16 is 2 GiB per copy, which fits an
    80 GB GPU next to the 13.5 GB model); batch_size: calibration sequences per layer
    forward (fewer, larger launches; the statistics are the same up to rounding); quant_settings: QuantConfig overrides (default:
    the DuQuant W4A4 defaults)."""
    from duquant.config import QuantConfig
    from duquant.modeling.qlinear import QuantLinear

    # The module, not the function of the same name that the duquant package exports.
    pipeline = importlib.import_module("duquant.quantize")

    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    config = config or llama2_7b_config(layers)
    qconfig = QuantConfig(method="duquant", seed=seed, **quant_settings)
    meta = {**environment(device), "level": "quantize", "dtype": str(dtype).replace("torch.", ""),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
            "calibration": f"{nsamples} x {seqlen} random token ids (torch.randint, seed {seed})",
            "quant_config": qconfig.to_dict(), "method": qconfig.describe(),
            "offload": "auto" if offload is None else offload, "batch_size": batch_size}

    t = time.perf_counter()
    model = random_llama(config, device, dtype, seed)
    synchronize(device)
    build_s = time.perf_counter() - t
    calibration = random_calibration(nsamples, seqlen, config.vocab_size, seed)
    reset_peak_memory(device)

    start = time.perf_counter()
    with stage_timers(pipeline, list(STAGES), device, _progress_writer(out_json, meta, start)) as stages:
        report = pipeline.quantize(model, qconfig, calibration, device=device, offload=offload, progress=progress,
                                  batch_size=batch_size)
    synchronize(device)
    wall_s = time.perf_counter() - start

    n_layers = config.num_hidden_layers
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
    per_layer = report.seconds - report.stage_seconds.get("capture", 0.0)
    result = {
        "meta": meta,
        "model_build_s": build_s,
        "total_s": report.seconds,
        "wall_s": wall_s,
        "stage_seconds": dict(report.stage_seconds),
        "stage_seconds_measured": stages,
        "per_layer_mean_s": per_layer / n_layers,
        "peak_bytes": peak_memory_bytes(device),
        "quantized_linears": quantized,
    }
    md = markdown(result)
    print(md)
    write_results(result, md, out_json, out_md)
    return result


def markdown(r: dict) -> str:
    m = r["meta"]
    shape = f"{shape_label(m['hidden'], m['intermediate'])}, {m['layers']} layers"
    peak = "—" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.1f} GiB"
    lines = [f"## quantize: {m['method']} runtime, {shape}, random weights, {m['dtype']}", "",
             f"{environment_line(m)}. Calibration: {m['calibration']}, {m.get('batch_size', 1)} per forward. One run (no repetition); "
             f"`duquant.quantize` with QuantConfig(method=\"duquant\"{_non_default(m)}) defaults, layer by layer on "
             f"{m['device']}.", "",
             "| measure | seconds |", "|---|---|",
             f"| **total (report.seconds)** | **{r['total_s']:.1f}** |",
             f"| per decoder layer (total − capture) / {m['layers']} | {r['per_layer_mean_s']:.2f} |",
             f"| wall clock around quantize() | {r['wall_s']:.1f} |",
             f"| model build (not part of quantization) | {r['model_build_s']:.1f} |"]
    # The report's "fit" clock starts before the statistics passes, so it holds them too.
    notes = {"fit": " (statistics passes + fitting)", "capture": " (embedding the calibration set)"}
    lines += [f"| report stage '{k}'{notes.get(k, '')} | {v:.2f} |" for k, v in r["stage_seconds"].items()]
    lines += ["", "Stages timed here (the pipeline's functions, device synchronized at each call's entry and exit):",
              "", "| stage | what | seconds | share of total |", "|---|---|---|---|"]
    for name, seconds in r["stage_seconds_measured"].items():
        lines.append(f"| {name} | {STAGES[name]} | {seconds:.2f} | {100 * seconds / max(r['total_s'], 1e-9):.0f}% |")
    lines += ["", f"Peak device memory during quantization: {peak}. Quantized linear layers: {r['quantized_linears']}."]
    return "\n".join(lines) + "\n"
