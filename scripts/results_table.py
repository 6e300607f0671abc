"""Run a list of quantization settings on one model; write all runs to runs.json plus a markdown table.

The model is loaded once and deep-copied for every setting; every run uses the same
calibration windows (same source, count, length and seed) and the same evaluation protocol.

    python scripts/results_table.py --model smollm2-135m --suite core --out results/run \
        --datasets wikitext2,c4,ptb --nsamples 128 --seqlen 2048
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

from duquant import QuantConfig, quantize
from duquant.data.calibration import CalibrationSpec, calibration_tokens, token_hash
from duquant.data.datasets import load_text
from duquant.evaluation.perplexity import perplexity
from duquant.model_loading import default_device, load_model, load_tokenizer, parse_dtype, resolve_model_source
from duquant.run_record import device_description, package_versions

# name -> QuantConfig keyword arguments. "fp" means: evaluate the unquantized model.
SUITES = {
    "core": {
        "fp": None,
        "rtn-w4a16": dict(method="rtn", wbits=4, abits=16),
        "rtn-w4a4": dict(method="rtn"),
        "smoothquant-w4a4": dict(method="smoothquant"),
        "duquant-w4a4": dict(method="duquant"),
        "rtn-w6a6": dict(method="rtn", wbits=6, abits=6),
        "smoothquant-w6a6": dict(method="smoothquant", wbits=6, abits=6),
        "duquant-w6a6": dict(method="duquant", wbits=6, abits=6),
        "rtn-w8a8": dict(method="rtn", wbits=8, abits=8),
        "smoothquant-w8a8": dict(method="smoothquant", wbits=8, abits=8),
        "duquant-w8a8": dict(method="duquant", wbits=8, abits=8),
    },
    # DuQuant Table 6 at W4A4.
    "ablation": {
        "smooth-only": dict(method="duquant", rotations=0, permute=False),
        "rotation-only": dict(method="duquant", smooth=False, rotations=1, permute=False),
        "smooth+rotation": dict(method="duquant", rotations=1, permute=False),
        "rotation+perm+rotation": dict(method="duquant", smooth=False),
        # full DuQuant is the core suite's duquant-w4a4 row
    },
    # The paper's fixed clip ratios (weights 0.8, activations 0.9) against no clipping, at 6 and 8 bits.
    "clip": {
        "rtn-w4a16-noclip": dict(method="rtn", wbits=4, abits=16, w_clip=1.0),
        "rtn-w8a8-noclip": dict(method="rtn", wbits=8, abits=8, w_clip=1.0, a_clip=1.0, qk_clip=1.0),
        "smoothquant-w8a8-noclip": dict(method="smoothquant", wbits=8, abits=8, w_clip=1.0, a_clip=1.0, qk_clip=1.0),
        "duquant-w8a8-noclip": dict(method="duquant", wbits=8, abits=8, w_clip=1.0, a_clip=1.0, qk_clip=1.0),
        "duquant-w6a6-noclip": dict(method="duquant", wbits=6, abits=6, w_clip=1.0, a_clip=1.0, qk_clip=1.0),
        "duquant-w4a4-wclip1": dict(method="duquant", w_clip=1.0),
    },
    "smoke": {"fp": None, "rtn-w4a4": dict(method="rtn"), "duquant-w4a4": dict(method="duquant", rotation_steps=8)},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--suite", action="append", required=True, help=f"one or more of {', '.join(SUITES)}")
    p.add_argument("--only", default=None, help="comma-separated run names to keep")
    p.add_argument("--out", required=True)
    p.add_argument("--datasets", default="wikitext2,c4,ptb")
    p.add_argument("--calib", default="c4")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="calibration seeds; with several, every run is repeated per seed (named run@seed)")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--eval-batch-size", type=int, default=8)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    device = args.device or default_device()
    dtype = parse_dtype(args.dtype, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model_source(args.model)
    tokenizer = load_tokenizer(source)
    base = load_model(source, dtype)
    datasets = [d for d in args.datasets.split(",") if d]
    test_ids = {d: tokenizer(load_text(d, "test"), return_tensors="pt").input_ids for d in datasets}
    runs = {name: kw for suite in args.suite for name, kw in SUITES[suite].items()}
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    rows = []
    specs = []
    for seed in args.seed:
        spec = CalibrationSpec(args.calib, args.nsamples, args.seqlen, seed)
        specs.append(spec.to_dict())
        calibration = calibration_tokens(tokenizer, spec, base.config.vocab_size)
        common = {"model": args.model, "calibration": spec.to_dict() | {"token_sha256": token_hash(calibration)},
                  "versions": package_versions(), "device": device_description(device), "dtype": str(dtype)}
        for name, kwargs in runs.items():
            rows.append(evaluate_run(name if len(args.seed) == 1 else f"{name}@{seed}", kwargs, base, calibration,
                                     common, test_ids, device, dtype, args))
            # One file for all runs, rewritten after each: a run cut short still leaves the finished ones.
            (out / "runs.json").write_text(json.dumps({r["name"]: r for r in rows}, indent=2))

    lines = ["| run | setting | " + " | ".join(datasets) + " | quantize s |", "|---|---|" + "---|" * len(datasets) + "---|"]
    for r in rows:
        ppl = " | ".join(f"{r['results'][d]['ppl']:.2f}" for d in datasets)
        lines.append(f"| {r['name']} | {r['label']} | {ppl} | {r['quantize_seconds']:.1f} |")
    windows = ", ".join(f"{d}: {rows[0]['results'][d]['windows']} windows" for d in datasets) if rows else ""
    calibrations = specs[0] if len(specs) == 1 else specs
    table = "\n".join(lines) + f"\n\n{common['device']}, {common['dtype']}; {windows}; calibration {calibrations}\n"
    (out / "table.md").write_text(table)
    print(table)


def evaluate_run(name: str, kwargs: dict | None, base, calibration: torch.Tensor, common: dict,
                 test_ids: dict, device: str, dtype: torch.dtype, args) -> dict:
    """Quantize a copy of `base` with QuantConfig(**kwargs) (None: the FP model) and evaluate it."""
    model = copy.deepcopy(base)
    record = dict(common, name=name)
    if kwargs is not None:
        config = QuantConfig(**kwargs)
        needs_calibration = config.method != "rtn" or config.weight_quantizer == "gptq"
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        report = quantize(model, config, calibration if needs_calibration else None, device, batch_size=8)
        record |= {"config": config.to_dict(), "label": config.describe(),
                   "quantize_seconds": round(report.seconds, 2), "quantize_stages": report.stage_seconds}
    else:
        record |= {"config": None, "label": f"FP ({str(dtype).removeprefix('torch.')})", "quantize_seconds": 0.0}
    model.to(device)
    record["results"] = {}
    for d in test_ids:
        t = time.perf_counter()
        r = perplexity(model, test_ids[d], args.seqlen, device, args.eval_batch_size, args.max_windows, d,
                       progress=False)
        record["results"][d] = r.to_dict() | {"seconds": round(time.perf_counter() - t, 2)}
        logging.info("%s %s %.3f", name, d, r.ppl)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return record


if __name__ == "__main__":
    main()
