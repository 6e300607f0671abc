# Sourced by the SmolLM2 real-backend scripts: gpu_setup.sh, $OUT, and the DuQuant W4A4 model of
# results/smollm2 (C4 128×2048 calibration, seed 0) quantized once into $q (kept while the machine
# stays warm; quantize.json lands in $OUT when it is made here).
source "$(dirname "${BASH_SOURCE[0]}")/gpu_setup.sh"
OUT=${OUT:-out}
mkdir -p "$OUT"
q=.carry/smollm2-duquant-w4a4
if [ ! -f "$q/config.json" ]; then
  python3 -m duquant.cli quantize "$gguf" --method duquant --wbits 4 --abits 4 --calib c4 --nsamples 128 \
    --seqlen 2048 --out "$q" --overwrite --quiet --json "$OUT/quantize.json" 2>&1 | tail -3
fi
