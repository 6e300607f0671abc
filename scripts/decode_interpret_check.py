"""Greedy decode of a saved W4A4 model on the real backend, on CPU, with the decode steps run
by the Triton kernels in Triton's interpreter (rows transform, joined q/k/v and gate/up GEMVs)
and, separately, by the kernels' PyTorch references; the prompt's prefill always runs on the
references (the prefill GEMM autotunes, which the interpreter cannot). Prints both token
streams and the largest logit difference per step: a check of the decode kernels' logic on a
real model without a GPU.

    PYTHONPATH=src python scripts/decode_interpret_check.py DIR --steps 8
"""
from __future__ import annotations

import argparse
import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from duquant.checkpoint import load_quantized  # noqa: E402
from duquant.modeling.kv_cache import QuantizedKVCache, has_quantized_kv  # noqa: E402
from duquant.modeling.real_linear import to_real_backend  # noqa: E402


def greedy(model, ids: torch.Tensor, steps: int, kernels: bool) -> tuple[list[int], list[torch.Tensor]]:
    os.environ.pop("DUQUANT_TRITON_INTERPRET", None)  # prefill: references
    cache = QuantizedKVCache(model) if has_quantized_kv(model) else None
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    tokens, logits = [], []
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(int(nxt))
        if kernels:
            os.environ["DUQUANT_TRITON_INTERPRET"] = "1"
        out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
        os.environ.pop("DUQUANT_TRITON_INTERPRET", None)
        logits.append(out.logits[0, -1].float())
    return tokens, logits


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompt", default="What is the capital of France?")
    args = p.parse_args()
    model, _, _ = load_quantized(args.model, "cpu", torch.float32)
    to_real_backend(model)
    tok = AutoTokenizer.from_pretrained(args.model)
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    ref_tokens, ref_logits = greedy(model, ids, args.steps, kernels=False)
    ker_tokens, ker_logits = greedy(model, ids, args.steps, kernels=True)
    print("references:", repr(tok.decode(ref_tokens)))
    print("kernels:   ", repr(tok.decode(ker_tokens)))
    for i, (a, b) in enumerate(zip(ref_logits, ker_logits)):
        rel = float((a - b).norm() / a.norm())
        print(f"step {i}: same token {ref_tokens[i] == ker_tokens[i]}, logits rel. diff {rel:.2e}")


if __name__ == "__main__":
    main()
