#!/usr/bin/env bash
# SmolLM2-135M DuQuant W4A4 calibrated with the simulated and with the real (kernel) forward of each
# just-quantized layer (QuantConfig.calib_forward), on the GPU machine: quantization time and WikiText-2
# perplexity (all windows, simulated evaluation) of each. Here, first: ../shared/tools/split-smollm2.sh.
# Call 1 carries .carry/smollm2-a (any command); call 2, at once, carries .carry/smollm2-b and runs:
#   OUT=$OUT bash scripts/gpu_calib_forward.sh
# Lands in $OUT: calib_{simulated,real}.json (run records with the perplexity) and logs.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
OUT=${OUT:-out}
mkdir -p "$OUT"
for forward in simulated real; do
  python3 -m duquant.cli quantize "$gguf" --method duquant --wbits 4 --abits 4 --calib c4 --nsamples 128 \
    --seqlen 2048 --calib-forward "$forward" --dtype float16 --eval-ppl wikitext2 --quiet \
    --json "$OUT/calib_$forward.json" > "$OUT/calib_$forward.log" 2>&1
  echo "$forward rc=$?"; tail -4 "$OUT/calib_$forward.log"
done
