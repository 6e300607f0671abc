"""Real backend on a saved quantized model with the fusions of `--fuse` switched on one at a
time (RMSNorm into the transforms, SwiGLU into down_proj's transform, the RoPE kernel), each
model loaded afresh, WikiText-2 perplexity against the simulated backend: which fusion moves
the real backend away from the simulated numbers. The whole set runs `--repeats` times (session
11's fused RMSNorm summed x² with float atomics, and its perplexity moved between runs).

    PYTHONPATH=src python scripts/fused_ablation.py QUANTIZED_DIR --out-json ablation.json
"""
from __future__ import annotations

import argparse
import json

import torch

from duquant.commands import load_for_inference
from duquant.data.datasets import load_text
from duquant.evaluation.perplexity import perplexity
from duquant.modeling.fused_rope import fuse_rotary
from duquant.modeling.fusion import fuse_norms, fuse_swiglu
from duquant.modeling.real_linear import to_real_backend

FUSIONS = {"norms": fuse_norms, "swiglu": fuse_swiglu, "rope": fuse_rotary}
CONFIGS = [None, (), ("norms",), ("swiglu",), ("rope",), ("norms", "swiglu", "rope")]  # None: simulated


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--dataset", default="wikitext2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out-json", default=None)
    args = p.parse_args()
    rows = []
    ids = None
    for repeat in range(args.repeats):
        for config in CONFIGS:
            model, tokenizer, _ = load_for_inference(args.model, "cuda", None)
            if ids is None:
                ids = tokenizer(load_text(args.dataset, "test", None), return_tensors="pt").input_ids
            if config is not None:
                to_real_backend(model, None, fuse=False)
                for name in config:
                    FUSIONS[name](model)
            ppl = perplexity(model, ids, 2048, "cuda", 4, None, args.dataset, progress=False).ppl
            name = "simulated" if config is None else "real" + "".join(f" +{c}" for c in config)
            rows.append({"repeat": repeat, "config": name, "ppl": ppl})
            sim = next(r["ppl"] for r in rows if r["config"] == "simulated")
            print(f"repeat {repeat}  {name:32s} {ppl:.3f}  ({100 * (ppl - sim) / sim:+.3f}% vs simulated)", flush=True)
            del model
            torch.cuda.empty_cache()
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
