#!/usr/bin/env bash
# Results tables on the GPU machine, for SmolLM2-135M (the `device` tool's H100).
# Here, first: ../shared/tools/split-smollm2.sh (writes .carry/smollm2-a and .carry/smollm2-b).
# Call 1 carries .carry/smollm2-a and runs `true`; call 2, at once, carries .carry/smollm2-b and runs
#   bash scripts/gpu_results.sh --suite core --out $OUT/core
# Later calls on the still-warm machine need no carry: the reassembled model stays in .carry/.
set -euo pipefail
gguf=.carry/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  cat .carry/smollm2-a/gguf.part0 .carry/smollm2-b/gguf.part1 > "$gguf"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c -
fi
[ -d .carry/site/gguf ] || python3 -m pip install -q --no-index --no-deps --target .carry/site .carry/smollm2-a/*.whl
if [ ! -d .carry/data ]; then cp -r .carry/smollm2-b/data .carry/data; fi
export PYTHONPATH=$PWD/src:$PWD/.carry/site DUQUANT_DATA_DIR=$PWD/.carry/data PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 scripts/results_table.py --model "$gguf" "$@"
