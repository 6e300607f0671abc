"""What each CLI subcommand does, on top of the library's public functions."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .checkpoint import is_quantized_dir, load_quantized, save_quantized
from .config import QuantConfig
from .data.calibration import CalibrationSpec, calibration_tokens, token_hash
from .data.datasets import load_text
from .evaluation.perplexity import perplexity
from .modeling.graph_generate import greedy_generate
from .modeling.kv_cache import QuantizedKVCache, has_quantized_kv
from .modeling.real_linear import to_real_backend, to_simulated_backend
from .model_loading import default_device, load_model, load_tokenizer, parse_dtype, resolve_model_source
from .quantize import quantize
from .run_record import device_description, package_versions

log = logging.getLogger("duquant")


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    return QuantConfig(
        method=args.method, wbits=args.wbits, abits=args.abits, qkv_bits=args.qkv_bits, kv_bits=args.kvbits,
        quantize_q=args.quantize_q, w_symmetric=args.w_sym, a_symmetric=args.a_sym, kv_symmetric=args.kv_sym,
        w_clip=args.w_clip, a_clip=args.a_clip, qk_clip=args.qk_clip, v_clip=args.v_clip,
        w_group_size=args.w_group_size, weight_quantizer=args.weight_quantizer, gptq_damp=args.gptq_damp,
        gptq_act_order=args.gptq_act_order, rotation=args.rotation, smooth=args.smooth, smooth_alpha=args.alpha,
        smooth_weight_stat=args.smooth_weight_stat, rotations=args.rotations, permute=args.permute,
        block_size=args.block_size, rotation_steps=args.rotation_steps, exchange=args.exchange,
        prefix_criterion=args.prefix_criterion, calib_forward=args.calib_forward, seed=args.seed,
    )


def _evaluate(model, tokenizer, datasets: list[str], args, device: str, label: str) -> dict:
    results = {}
    seqlen = args.eval_seqlen or getattr(args, "seqlen", None) or 2048
    batch = args.eval_batch_size or (4 if device.startswith("cuda") else 1)
    for name in datasets:
        ids = tokenizer(load_text(name, "test", args.data_dir), return_tensors="pt").input_ids
        t = time.perf_counter()
        result = perplexity(model, ids, seqlen, device, batch, args.max_windows, name, progress=not args.quiet)
        entry = result.to_dict() | {"seconds": round(time.perf_counter() - t, 2)}
        results[name] = entry
        log.info("%s %s perplexity %.3f (%d windows of %d, %d tokens)", label, name, result.ppl, result.windows,
                 seqlen, result.tokens)
    return results


def apply_backend(model, args: argparse.Namespace) -> dict | None:
    """Switch the quantized linears to the integer kernels when --backend real asks for it."""
    if getattr(args, "backend", "simulated") != "real":
        return None
    prefill = None if args.prefill_weight == "none" else args.prefill_weight
    report = to_real_backend(model, prefill, fuse=getattr(args, "fuse", True))
    if not report["real"]:
        raise ValueError("--backend real: the model has no quantized linear layer the W4A4 kernels cover "
                         "(they need 4-bit asymmetric weights and <=4-bit asymmetric per-token activations)")
    log.info("real backend: %d linear layers on W4A4 kernels, %d kept simulated%s", len(report["real"]),
             len(report["simulated"]), f" ({', '.join(report['simulated'][:3])}, ...)" if report["simulated"] else "")
    return {"backend": "real", "prefill_weight": prefill, "real_layers": len(report["real"]),
            "simulated_layers": report["simulated"], "fuse": bool(report["fused"]),
            "fused_modules": len(report["fused"]), "fused_rope_modules": len(report["rope"])}


def _print_table(rows: list[tuple[str, dict]], datasets: list[str]) -> None:
    if not rows or not datasets:
        return
    print("| model | " + " | ".join(datasets) + " |")
    print("|---|" + "---|" * len(datasets))
    for label, results in rows:
        print(f"| {label} | " + " | ".join(f"{results[d]['ppl']:.3f}" for d in datasets) + " |")


def quantize_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    device = args.device or default_device()
    dtype = parse_dtype(args.dtype, device)
    times: dict[str, float] = {}
    record: dict = {"command": "quantize", "model": args.model, "config": config.to_dict(),
                    "versions": package_versions(), "device": device_description(device), "dtype": str(dtype)}

    t = time.perf_counter()
    source = resolve_model_source(args.model)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype)
    times["load"] = time.perf_counter() - t
    rows = []
    if args.eval_fp and args.eval_ppl:
        model.to(device)
        t = time.perf_counter()
        record["fp_results"] = _evaluate(model, tokenizer, args.eval_ppl, args, device, "FP")
        times["eval_fp"] = time.perf_counter() - t
        rows.append(("FP", record["fp_results"]))
        model.to("cpu")

    calibration = None
    if config.method not in ("rtn", "quarot") or config.weight_quantizer == "gptq":  # RTN and QuaRot-RTN need none
        spec = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed)
        t = time.perf_counter()
        calibration = calibration_tokens(tokenizer, spec, model.config.vocab_size, args.data_dir)
        times["calibration_data"] = time.perf_counter() - t
        record["calibration"] = spec.to_dict() | {"token_sha256": token_hash(calibration)}
    else:
        record["calibration"] = None

    report = quantize(model, config, calibration, device, batch_size=args.calib_batch_size, progress=not args.quiet)
    times["quantize"] = report.seconds
    record["quantize_stages"] = report.stage_seconds
    log.info("%s: quantization took %.1f s on %s", config.describe(), report.seconds, record["device"])

    if args.eval_ppl:
        model.to(device)
        backend = apply_backend(model, args)
        label = config.describe() + (" [real]" if backend else "")
        t = time.perf_counter()
        record["results"] = _evaluate(model, tokenizer, args.eval_ppl, args, device, label)
        times["eval"] = time.perf_counter() - t
        rows.append((label, record["results"]))
        if backend:
            record["backend"] = backend
            to_simulated_backend(model)  # the checkpoint stores the QuantLinear layout
    record["seconds"] = {k: round(v, 2) for k, v in times.items()}
    if args.out:
        model.to("cpu")
        t = time.perf_counter()
        save_quantized(model, tokenizer, args.out, config, record, overwrite=args.overwrite)
        record["seconds"]["save"] = round(time.perf_counter() - t, 2)
        log.info("saved to %s", args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
    _print_table(rows, args.eval_ppl)
    return 0


def load_for_inference(spec: str, device: str, dtype_name: str | None):
    """A saved quantized directory, or any full-precision model spec; returns (model, tokenizer, label)."""
    if is_quantized_dir(spec):
        dtype = None if dtype_name in (None, "auto") else parse_dtype(dtype_name, device)
        model, config, _ = load_quantized(spec, device, dtype)
        return model, AutoTokenizer.from_pretrained(spec), config.describe()
    source = resolve_model_source(spec)
    model = load_model(source, parse_dtype(dtype_name, device)).to(device)
    return model, load_tokenizer(source), "FP"


def eval_command(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    model, tokenizer, label = load_for_inference(args.model, device, args.dtype)
    backend = apply_backend(model, args)
    label += " [real]" if backend else ""
    args.eval_seqlen = args.seqlen
    results = _evaluate(model, tokenizer, args.ppl, args, device, label)
    _print_table([(label, results)], args.ppl)
    if args.json:
        record = {"command": "eval", "model": args.model, "label": label, "results": results, "backend": backend,
                  "versions": package_versions(), "device": device_description(device)}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


@torch.no_grad()
def generate_command(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    model, tokenizer, _ = load_for_inference(args.model, device, args.dtype)
    apply_backend(model, args)
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt").to(device)
    prompt = inputs.input_ids.shape[1]
    if args.no_cuda_graph or inputs.input_ids.device.type != "cuda":
        # A model with quantized K/V generates from a cache that holds the quantized codes.
        cache = {"past_key_values": QuantizedKVCache(model)} if has_quantized_kv(model) else {}
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, **cache)
    else:  # one CUDA graph replayed per token (K/V codes in a static cache where quantized)
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        result = greedy_generate(model, inputs.input_ids, args.max_new_tokens, eos)
        output = result.ids
        if result.new_tokens > 1:
            log.info("decoded %d tokens after the first at %.1f tokens/s (%s)", result.new_tokens - 1,
                     (result.new_tokens - 1) / max(result.decode_seconds, 1e-9), result.mode)
    print(tokenizer.decode(output[0, prompt:], skip_special_tokens=True))
    return 0
