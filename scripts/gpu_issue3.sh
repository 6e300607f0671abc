#!/usr/bin/env bash
# Issue 3 results on the GPU machine, for SmolLM2-135M: QuaRot-RTN, QuaRot-GPTQ, DuQuant and
# DuQuant+GPTQ at W4A4 and W4A4KV4, in the DuQuant setting and in the QuaRot setting
# (scripts/issue3_suite.py says exactly what each run quantizes), wikitext2, c4, ptb (all
# windows), calibration c4 128 x 2048, seed 0. One JSON per run, table.md, quantization time.
# Setup as scripts/gpu_results.sh (the model and data arrive in .carry/). Two calls, one per
# setting, each well under the 10-minute limit of one command:
#   bash scripts/gpu_issue3.sh --suite issue3-duquant --out $OUT/issue3-duquant
#   bash scripts/gpu_issue3.sh --suite issue3-quarot --out $OUT/issue3-quarot
# Extra arguments go to results_table.py (e.g. --only NAME,NAME to split further).
# Locally (CPU smoke run): MODEL=smollm2-135m DUQUANT_DATA_DIR=../shared/data bash scripts/gpu_issue3.sh \
#   --suite issue3-quarot --out /tmp/issue3 --nsamples 2 --seqlen 128 --max-windows 2
set -euo pipefail
if [ -z "${MODEL:-}" ]; then
  source "$(dirname "$0")/gpu_setup.sh"
  MODEL=$gguf
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
python3 scripts/issue3_suite.py --model "$MODEL" --datasets wikitext2,c4,ptb --calib c4 --nsamples 128 \
  --seqlen 2048 --seed 0 "$@"
