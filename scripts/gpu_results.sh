#!/usr/bin/env bash
# Results tables on the GPU machine, for SmolLM2-135M (the `device` tool's H100).
# Here, first: ../shared/tools/split-smollm2.sh (writes .carry/smollm2-a and .carry/smollm2-b).
# Call 1 carries .carry/smollm2-a and runs `true`; call 2, at once, carries .carry/smollm2-b and runs
#   bash scripts/gpu_results.sh --suite core --out $OUT/core
# Later calls on the still-warm machine need no carry: the reassembled model stays in .carry/.
set -euo pipefail
source "$(dirname "$0")/gpu_setup.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 scripts/results_table.py --model "$gguf" "$@"
