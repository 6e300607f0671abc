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
#   mma       (after the int8-MMA decode kernel became one launch with joined weights) its GPU tests, the decode
#             linear groups at M = 1/4/8/12/16 as the model runs them, and the kernel bench at M = 4/8/16
#   mma-tiles (after its default tile changed) its tests, and the decode linear groups at M = 4/6/8/16 as the model
#             runs them with the dp4a GEMV up to 8 tokens (then MMA) and up to 4 (DUQUANT_GEMV_MAX_M)
#   mma-model the layer and e2e decode benches at batch 1/4/8/16 with it
#   wide      decode at 16/32/64 tokens with the MMA kernel serving up to 64 (DUQUANT_DECODE_MAX_M=64) and up to 16
# Results land in $OUT as JSON + markdown + logs; results/bench_h100/session14/ keeps them.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # $OUT, PYTHONPATH, $bench, gpu.txt
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
  mma)  # the int8-MMA decode kernel for 9–16 tokens as one launch (nibbles four bytes at a time, joined weights)
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_kernels_gpu.py \
      -k "decode_gemm or decode_gemv or joined or ops_end_to_end or real_quant_linear" > "$OUT/pytest_mma.log" 2>&1
    echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_mma.log" | head -20
    timeout 150 python3 scripts/decode_kernels.py --chains --no-one-launch --ms 1 4 8 12 16 \
      --out-json "$OUT/decode_chains_mma.json" --out-md "$OUT/decode_chains_mma.md" > "$OUT/decode_chains_mma.log" 2>&1
    cat "$OUT/decode_chains_mma.md"
    timeout 150 "${bench[@]}" --level kernel --ms 4 8 16 --out-json "$OUT/kernel_decode_mma.json" \
      --out-md "$OUT/kernel_decode_mma.md" > "$OUT/kernel_decode_mma.log" 2>&1; head -16 "$OUT/kernel_decode_mma.md"
    ;;
  mma-tiles)  # after the default tile changed (64 × 256, 4 stages; BLOCK_K divides K): tests, where GEMV and MMA cross
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_kernels_gpu.py \
      -k "decode_gemm or ops_end_to_end" > "$OUT/pytest_mma_tiles.log" 2>&1
    echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_mma_tiles.log" | head -20
    for g in 8 4; do  # the model's dispatch with the dp4a GEMV up to 8 tokens, and up to 4
      DUQUANT_GEMV_MAX_M=$g timeout 120 python3 scripts/decode_kernels.py --chains --no-one-launch --ms 4 6 8 16 \
        --out-json "$OUT/decode_chains_gemv$g.json" --out-md "$OUT/decode_chains_gemv$g.md" > "$OUT/decode_chains_gemv$g.log" 2>&1
      cut -d'|' -f2,3,4,5,13,14 "$OUT/decode_chains_gemv$g.md"
    done
    ;;
  mma-model)  # decode steps with it: one layer and the 32-layer model
    timeout 200 "${bench[@]}" --level layer --variants bf16 w4a4_fused --batches --decode-batches 1 4 8 16 \
      --no-profile --out-json "$OUT/layer_decode_mma.json" --out-md "$OUT/layer_decode_mma.md" > "$OUT/layer_decode_mma.log" 2>&1
    grep -E "^\| decode" "$OUT/layer_decode_mma.md"; tail -2 "$OUT/layer_decode_mma.log"
    timeout 300 "${bench[@]}" --level e2e --variants bf16 w4a4_fused w4a4_fused_qkv4 --batches --decode-batches 1 8 16 \
      --no-profile --out-json "$OUT/e2e_decode_mma.json" --out-md "$OUT/e2e_decode_mma.md" > "$OUT/e2e_decode_mma.log" 2>&1
    grep -E "^\| decode" "$OUT/e2e_decode_mma.md"; tail -2 "$OUT/e2e_decode_mma.log"
    ;;
  wide)  # 17–64 tokens through the MMA decode kernel (DUQUANT_DECODE_MAX_M=64) against the prefill GEMM path (16)
    for d in 16 64; do
      DUQUANT_DECODE_MAX_M=$d timeout 100 python3 scripts/decode_kernels.py --chains --no-one-launch --ms 16 32 64 \
        --out-json "$OUT/decode_chains_max$d.json" --out-md "$OUT/decode_chains_max$d.md" > "$OUT/decode_chains_max$d.log" 2>&1
      cut -d'|' -f2,3,4,13,14 "$OUT/decode_chains_max$d.md"; tail -1 "$OUT/decode_chains_max$d.log"
      DUQUANT_DECODE_MAX_M=$d timeout 120 "${bench[@]}" --level layer --variants bf16 w4a4_fused --batches \
        --decode-batches 16 32 64 --no-profile --out-json "$OUT/layer_decode_max$d.json" --out-md "$OUT/layer_decode_max$d.md" \
        > "$OUT/layer_decode_max$d.log" 2>&1
      grep -E "^\| decode" "$OUT/layer_decode_max$d.md"; tail -1 "$OUT/layer_decode_max$d.log"
    done
    ;;
  *)
    echo "usage: OUT=\$OUT bash scripts/gpu_final.sh {decode|prefill|layer|e2e|quantize|mma|mma-tiles|mma-model|wide}"; exit 2
    ;;
esac
