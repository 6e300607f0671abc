"""Tokens per second of greedy generation on a CUDA device, eager against CUDA-graph steps.

    python scripts/generate_speed.py --out-json out/generate_speed.json [--layers 32] [--new 64]

A LLaMA-2-7B-shaped model with random weights (`duquant.bench.layer.build_variant`), BF16
W4A4 (real backend, every fusion) and W4A4 with 4-bit Q/K/V (DuQuant's default; K/V codes in a
QuantizedKVCache for `generate`, a StaticQuantizedKVCache for `greedy_generate`), batch 1, a
prompt of 128 random token ids. For each:
transformers' `model.generate` (eager steps, DynamicCache), `greedy_generate` eager (StaticCache)
and `greedy_generate` with one CUDA graph per step (what `duquant generate` runs on CUDA). Decode
tokens/s exclude the prompt and the first token; the median of `--reps` runs after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from duquant.bench.layer import build_variant, llama2_7b_config
from duquant.bench.timing import environment
from duquant.modeling.graph_generate import greedy_generate
from duquant.modeling.kv_cache import QuantizedKVCache, has_quantized_kv


def _hf_generate_seconds(model, ids: torch.Tensor, new: int) -> float:
    """Decode seconds of model.generate: the run minus a 1-token run (prompt + first token).
    A model with quantized K/V generates from a QuantizedKVCache, as `duquant generate` does."""
    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        cache = {"past_key_values": QuantizedKVCache(model)} if has_quantized_kv(model) else {}
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **cache)
        torch.cuda.synchronize()
        return time.perf_counter() - t
    return timed(new) - timed(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=["bf16", "w4a4_fused", "w4a4_fused_qkv4"])
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for variant in args.variants:
        model = build_variant(llama2_7b_config(args.layers), variant, device)
        ids = torch.randint(0, model.config.vocab_size, (1, 128), device=device,
                            generator=torch.Generator("cuda").manual_seed(0))
        with torch.no_grad():
            ways = {"transformers generate (eager)": lambda: _hf_generate_seconds(model, ids, args.new),
                    "greedy_generate eager": lambda: greedy_generate(model, ids, args.new, use_graph=False).decode_seconds,
                    "greedy_generate CUDA graph": lambda: greedy_generate(model, ids, args.new).decode_seconds}
            for way, fn in ways.items():
                fn()  # warm-up (compilation, allocator)
                seconds = statistics.median(fn() for _ in range(args.reps))
                rows.append({"variant": variant, "way": way, "decode_tokens_per_s": (args.new - 1) / seconds,
                             "ms_per_token": seconds / (args.new - 1) * 1e3})
                print(f"{variant:12s} {way:32s} {rows[-1]['decode_tokens_per_s']:8.1f} tok/s "
                      f"({rows[-1]['ms_per_token']:.2f} ms/token)", flush=True)
        del model
        torch.cuda.empty_cache()
    if args.out_json:
        meta = environment(device) | {"layers": args.layers, "new_tokens": args.new, "prompt": 128, "batch": 1,
                                      "reps": args.reps}
        with open(args.out_json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
