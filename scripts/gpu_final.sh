#!/usr/bin/env bash
# Session 14: every issue-4 target measured again on one code version, one device call per step
# (each fits the 10-minute limit). BF16 is measured in the same run every time.
# Usage on the device machine, repo root: OUT=$OUT bash scripts/gpu_final.sh STEP
#   decode    GPU tests of the decode attention and GEMV paths, then each decode linear group with its
#             transform at M = 1/4/8/16 as the model runs it (scripts/decode_kernels.py --chains),
#             then duquant bench --level kernel at decode sizes
#   prefill   duquant bench --level kernel at prefill sizes (M = 2048 / 8192 / 32768)
#   layer     duquant bench --level layer: prefill at 2048 × batch 1/4/16, decode at batch 1/4/16/64
#   e2e       duquant bench --level e2e: prefill batch 1/4, decode batch 1/4/16/64
#   quantize  duquant bench --level quantize (DuQuant on the LLaMA-2-7B-shaped model, 8 sequences per forward)
# Results land in $OUT as JSON + markdown + logs; results/bench_h100/session14/ keeps them.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
bench=(python3 -c "import sys; from duquant.bench import main; sys.exit(main(sys.argv[1:]))")
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-}" in
  decode)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_kernels_gpu.py \
      -k "decode_attention or decode_gemv or joined" > "$OUT/pytest_decode.log" 2>&1
    echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_decode.log" | head -20
    timeout 180 python3 scripts/decode_kernels.py --chains --no-one-launch --ms 1 4 8 16 \
      --out-json "$OUT/decode_chains.json" --out-md "$OUT/decode_chains.md" > "$OUT/decode_chains.log" 2>&1
    cat "$OUT/decode_chains.md"; tail -2 "$OUT/decode_chains.log"
    timeout 180 "${bench[@]}" --level kernel --ms 1 4 16 64 --out-json "$OUT/kernel_decode.json" \
      --out-md "$OUT/kernel_decode.md" > "$OUT/kernel_decode.log" 2>&1; head -30 "$OUT/kernel_decode.md"
    ;;
  prefill)
    timeout 560 "${bench[@]}" --level kernel --ms 2048 8192 32768 --out-json "$OUT/kernel_prefill.json" \
      --out-md "$OUT/kernel_prefill.md" > "$OUT/kernel_prefill.log" 2>&1; head -30 "$OUT/kernel_prefill.md"
    tail -3 "$OUT/kernel_prefill.log"
    ;;
  layer)
    timeout 560 "${bench[@]}" --level layer --variants bf16 bf16_rope w4a4_fused w4a4_fp8w_fused \
      --batches 1 4 16 --decode-batches 1 4 16 64 --out-json "$OUT/layer.json" --out-md "$OUT/layer.md" \
      > "$OUT/layer.log" 2>&1
    grep -E "^\| (prefill|decode|peak)" "$OUT/layer.md"; tail -3 "$OUT/layer.log"
    ;;
  e2e)
    timeout 560 "${bench[@]}" --level e2e --variants bf16 bf16_rope w4a4_fused w4a4_fused_qkv4 \
      --batches 1 4 --decode-batches 1 4 16 64 --no-profile --out-json "$OUT/e2e.json" --out-md "$OUT/e2e.md" \
      > "$OUT/e2e.log" 2>&1
    grep -E "^\| (prefill|decode|peak)" "$OUT/e2e.md"; tail -3 "$OUT/e2e.log"
    ;;
  quantize)
    timeout 560 "${bench[@]}" --level quantize --out-json "$OUT/quantize.json" --out-md "$OUT/quantize.md" \
      > "$OUT/quantize.log" 2>&1; tail -30 "$OUT/quantize.md"; tail -3 "$OUT/quantize.log"
    ;;
  *)
    echo "usage: OUT=\$OUT bash scripts/gpu_final.sh {decode|prefill|layer|e2e|quantize}"; exit 2
    ;;
esac
