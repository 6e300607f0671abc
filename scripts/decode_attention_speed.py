"""Decode attention over a 4-bit KV cache (`kernels/triton_decode_attention.py`), variant by
variant, against SDPA over a BF16 cache of the same length (what a BF16 model's decode step runs)
in the same run: CUDA-graph µs per call (one layer), the bytes floor of the codes (3 TB/s), and each
variant's error against SDPA over the dequantized cache (a wrong kernel must not look fast).

Variants: session 10's kernel (every element dequantized and rounded to BF16, a plain loop), the
folded form (scale and zero point applied per row, codes turned into floats by a mantissa trick),
on 8 warps, with the two products on the tensor cores (the query or the probabilities padded to 16
MMA rows, one program per query head; with pipelined loads), and the default since session 13: one
program per KV head whose query heads are the MMA rows (GQA reads each K/V tile once per group).

    PYTHONPATH=src python scripts/decode_attention_speed.py --out-json a.json --out-md a.md
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from duquant.bench.kernels import _graph_bench
from duquant.bench.output import report
from duquant.kernels.triton_decode_attention import decode_attention
from duquant.quant.quantizer import QuantSpec
from duquant.quant.row_codes import decode_rows, encode_rows

VARIANTS = {"session 10 (dequantize, round)": dict(fold=False),
            "folded": dict(fold=True, dot=False), "folded, 8 warps": dict(fold=True, dot=False, warps=8),
            "folded, MMA (session 12)": dict(dot=True, grouped=False),
            "folded, MMA, 2 stages": dict(dot=True, stages=2, grouped=False),
            "folded, MMA, per KV head (default)": dict(dot=True, grouped=True)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16, 64])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=False, clip=1.0)
    rows, lines = [], ["| heads (q/kv) × dim | batch | variant | µs | vs BF16 SDPA | bytes floor µs | rel. error |",
                       "|---|---|---|---|---|---|---|"]
    for hq, hkv, d in ((32, 32, 128), (32, 8, 128), (9, 3, 64)):  # LLaMA-2-7B, LLaMA-3-8B, SmolLM2
        for b in args.batches:
            n = args.length
            k16, v16 = (torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            keys, values = encode_rows(k16, spec), encode_rows(v16, spec)
            query = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
            mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device="cuda")
            kd = decode_rows(keys, spec, torch.bfloat16).repeat_interleave(hq // hkv, dim=1)
            vd = decode_rows(values, spec, torch.bfloat16).repeat_interleave(hq // hkv, dim=1)
            want = F.scaled_dot_product_attention(query, kd, vd, attn_mask=mask).transpose(1, 2).float()
            gqa = hq != hkv
            sdpa = _graph_bench([lambda: F.scaled_dot_product_attention(query, k16, v16, attn_mask=mask,
                                                                        enable_gqa=gqa)] * 4)
            floor = 2 * b * hkv * n * (d // 2 + 8) / 3.0e6
            shape = f"{hq}/{hkv} × {d}"
            rows.append({"shape": shape, "batch": b, "variant": "BF16 SDPA (BF16 cache)", "us": sdpa})
            lines.append(f"| {shape} | {b} | BF16 SDPA (BF16 cache) | {sdpa:.1f} | 1.00× | {4 * floor:.1f} (bf16) | |")
            for name, v in VARIANTS.items():
                out = decode_attention(query, keys, values, mask, d ** -0.5, **v)
                err = float((out.float() - want).abs().max() / want.abs().max())
                assert err < 2e-2, (name, err)
                us = _graph_bench([lambda v=v: decode_attention(query, keys, values, mask, d ** -0.5, **v)] * 4)
                rows.append({"shape": shape, "batch": b, "variant": name, "us": us, "floor_us": floor, "rel_err": err})
                lines.append(f"| {shape} | {b} | {name} | {us:.1f} | {sdpa / us:.2f}× | {floor:.1f} | {err:.1e} |")
                print(lines[-1], flush=True)
            k16 = v16 = keys = values = kd = vd = None  # free before the next size (the lambdas read these names)
            torch.cuda.empty_cache()
    report({"decode_attention": rows}, lines, f"one layer's decode attention, {args.length}-token cache; "
           "CUDA-graph µs per call (4 calls per graph, median of 5×20 replays)", args.out_json, args.out_md)


if __name__ == "__main__":
    main()
