#!/usr/bin/env bash
# Session 13: decode attention with a KV head's query heads as the MMA rows (grouped, the default).
#   OUT=$OUT bash scripts/gpu_decode_attention.sh
# Lands in $OUT: gpu.txt, pytest_decode_attention.log, decode_attention.{json,md}.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # $OUT, PYTHONPATH, $bench, gpu.txt
timeout 240 python3 -m pytest -q tests/test_kernels_gpu.py -k "decode_attention or greedy_generate or kv_quant" 2>&1 | tail -6 | tee "$OUT/pytest_decode_attention.log"
python3 scripts/decode_attention_speed.py --out-json "$OUT/decode_attention.json" --out-md "$OUT/decode_attention.md" 2>&1 | grep -v "^|" | tail -5
