#!/usr/bin/env bash
# The GPU experiments of issue 4, one device call per step (each fits the 10-minute limit).
# Usage on the device machine, repo root: OUT=$OUT bash scripts/gpu_issue4.sh STEP
#   parity     GPU tests of the transform kernels (tiles, rows, fused norm/SwiGLU, symmetric), then the transform timing table
#   kernel     duquant bench --level kernel (decode sizes, with the dp4a GEMV sweep; then prefill sizes)
#   parity-rest  the other GPU tests (GEMMs, GEMV, Hadamard, real backend, bench)
#   quantize   calibration GPU tests, then duquant bench --level quantize (DuQuant on the LLaMA-2-7B-shaped model;
#              CALIB_BATCH=8: 8 per forward), then scripts/profile_quantize.py (2 layers; PROFILE=0 skips)
#   decode     GPU tests of the joined q/k/v (gate/up) GEMV and the fused norm, the fused-norm failure hunt
#              (scripts/fused_norm_repro.py, with the old data_ptr-keyed factor cache and with the fixed one),
#              then scripts/decode_kernels.py (joined vs separate GEMVs vs BF16; decode transform variants)
#   pdl        GPU tests of the decode chain with programmatic dependent launch (and the joined GEMV), then
#              scripts/decode_kernels.py --chains (transform → GEMV per linear group, plain and PDL, against
#              BF16), then the layer decode bench with and without PDL (bf16, w4a4_fused, w4a4_fused_pdl)
#   calib-real GPU tests of calibration through the real kernels and of the PDL chain, the 7B quantization
#              bench with --calib-forward real (CALIB_BATCH, default 8), then the layer decode bench with PDL
#   layer      duquant bench --level layer (bf16, w4a4, w4a4_fp8w, w4a4_fp8w_fused; eager and CUDA-graph prefill)
#              (layer, e2e: the default DUQUANT_TRANSFORM_KERNEL=auto sends one token of K ≤ 4096 to the rows kernel)
#   e2e        duquant bench --level e2e (bf16, bf16_rope, w4a4, w4a4_fused)
#   rows       duquant bench --level layer --variants bf16 w4a4_fp8w w4a4_fp8w_fused, rows transform kernel
#   three      the same layer bench (bf16, w4a4_fp8w_fused) with the three-launch transform at every M
# Results land in $OUT as JSON + markdown (+ logs); copy them to results/ with the command line.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # $OUT, PYTHONPATH, $bench, gpu.txt
case "${1:-}" in
  parity)
    # the transform kernels' 128 cases (~5 min of compiles); parity-rest runs the others
    timeout 360 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_kernels_gpu.py \
      -k "transform or symmetric or fused or repeats" > "$OUT/pytest.log" 2>&1
    echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest.log" | head -30
    timeout 200 python3 scripts/transform_timing.py --out-json "$OUT/transform.json" --ms 1 16 64 2048 8192 \
      > "$OUT/transform.log" 2>&1; tail -14 "$OUT/transform.log"
    ;;
  parity-rest)  # the other GPU tests (GEMMs, GEMV, Hadamard, real backend, bench), most needed first
    t=tests/test_kernels_gpu.py
    timeout 400 python3 -m pytest -q -p no:cacheprovider -rf --tb=short $t::test_real_quant_linear_matches_simulated_on_gpu \
      $t::test_ops_end_to_end $t::test_prefill_gemm_int8_and_fp8 $t::test_decode_gemv_cuda_graph \
      tests/test_bench.py $t::test_hadamard_quantize $t::test_decode_gemv > "$OUT/pytest_rest.log" 2>&1
    echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_rest.log" | head -30
    ;;
  kernel)
    timeout 280 "${bench[@]}" --level kernel --ms 1 4 16 64 --out-json "$OUT/kernel_decode.json" --out-md "$OUT/kernel_decode.md" \
      > "$OUT/kernel_decode.log" 2>&1; head -12 "$OUT/kernel_decode.md"
    timeout 280 "${bench[@]}" --level kernel --ms 2048 8192 32768 --out-json "$OUT/kernel_prefill.json" \
      --out-md "$OUT/kernel_prefill.md" > "$OUT/kernel_prefill.log" 2>&1; head -14 "$OUT/kernel_prefill.md"
    ;;
  quantize)
    b=${CALIB_BATCH:-1}  # calibration sequences per layer forward
    # the calibration path's GPU shortcuts (greedy loop as a CUDA graph, dense Hadamard) first
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_calibration_gpu.py \
      > "$OUT/pytest_calibration.log" 2>&1; echo "pytest rc=$?"; tail -3 "$OUT/pytest_calibration.log"
    timeout 580 "${bench[@]}" --level quantize --calib-batch-size "$b" --out-json "$OUT/quantize_b$b.json" \
      --out-md "$OUT/quantize_b$b.md" > "$OUT/quantize_b$b.log" 2>&1; tail -30 "$OUT/quantize_b$b.md"
    # kernel by kernel: two layers under torch.profiler (PROFILE=0 skips)
    [ "${PROFILE:-1}" = 0 ] || timeout 200 python3 scripts/profile_quantize.py --layers 2 --batch-size "$b" \
      --out-dir "$OUT" > "$OUT/profile_quantize.log" 2>&1; grep -A22 "sorted by self_cuda" "$OUT/profile_quantize.log" | cut -c1-150
    ;;
  decode)
    t=tests/test_kernels_gpu.py
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short $t -k "joined or gemv_cuda_graph or fused_rms_norm" \
      > "$OUT/pytest_decode.log" 2>&1; echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_decode.log" | head -20
    for cache in old new; do
      flag=""; [ $cache = old ] && flag="--old-cache"
      timeout 90 python3 scripts/fused_norm_repro.py --iters 40 $flag --out-json "$OUT/fused_norm_repro_$cache.json" \
        > "$OUT/fused_norm_repro_$cache.log" 2>&1; grep -c MISMATCH "$OUT/fused_norm_repro_$cache.log"; tail -1 "$OUT/fused_norm_repro_$cache.log"
    done
    timeout 200 python3 scripts/decode_kernels.py --out-json "$OUT/decode_kernels.json" --out-md "$OUT/decode_kernels.md" \
      > "$OUT/decode_kernels.log" 2>&1; cat "$OUT/decode_kernels.md"
    ;;
  pdl)
    t=tests/test_kernels_gpu.py
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rf --tb=short $t -k "pdl or joined or gemv_cuda_graph" \
      > "$OUT/pytest_pdl.log" 2>&1; echo "pytest rc=$?"; grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_pdl.log" | head -20
    timeout 150 python3 scripts/decode_kernels.py --chains --ms 1 4 --out-json "$OUT/decode_chains.json" \
      --out-md "$OUT/decode_chains.md" > "$OUT/decode_chains.log" 2>&1; cat "$OUT/decode_chains.md"; tail -3 "$OUT/decode_chains.log"
    timeout 200 "${bench[@]}" --level layer --variants bf16 w4a4_fused w4a4_fused_pdl --batches --decode-batches 1 4 8 16 \
      --no-profile --out-json "$OUT/layer_pdl.json" --out-md "$OUT/layer_pdl.md" > "$OUT/layer_pdl.log" 2>&1
    grep -E "^\| decode" "$OUT/layer_pdl.md"; tail -3 "$OUT/layer_pdl.log"
    ;;
  calib-real)
    b=${CALIB_BATCH:-8}
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_calibration_gpu.py \
      tests/test_kernels_gpu.py -k "real_kernels or pdl" > "$OUT/pytest_calib_real.log" 2>&1; echo "pytest rc=$?"
    grep -E "passed|failed|^FAILED|^E  " "$OUT/pytest_calib_real.log" | head -20
    timeout 300 "${bench[@]}" --level quantize --calib-batch-size "$b" --calib-forward real \
      --out-json "$OUT/quantize_real_b$b.json" --out-md "$OUT/quantize_real_b$b.md" > "$OUT/quantize_real_b$b.log" 2>&1
    tail -22 "$OUT/quantize_real_b$b.md"; tail -3 "$OUT/quantize_real_b$b.log"
    timeout 150 "${bench[@]}" --level layer --variants bf16 w4a4_fused w4a4_fused_pdl --batches --decode-batches 1 4 \
      --no-profile --out-json "$OUT/layer_pdl.json" --out-md "$OUT/layer_pdl.md" > "$OUT/layer_pdl.log" 2>&1
    grep -E "^\| decode" "$OUT/layer_pdl.md"; tail -2 "$OUT/layer_pdl.log"
    ;;
  layer|e2e)
    # VARIANTS="bf16 w4a4_fused ..." and BENCH_ARGS="--batches 1 4 ..." narrow the run
    timeout 560 "${bench[@]}" --level "$1" ${VARIANTS:+--variants $VARIANTS} ${BENCH_ARGS:-} --out-json "$OUT/$1.json" \
      --out-md "$OUT/$1.md" > "$OUT/$1.log" 2>&1
    grep -E "^\| (prefill|decode)" "$OUT/$1.md"
    ;;
  rows)
    DUQUANT_TRANSFORM_KERNEL=rows timeout 560 "${bench[@]}" --level layer --variants bf16 w4a4_fp8w w4a4_fp8w_fused \
      --out-json "$OUT/layer_rows.json" --out-md "$OUT/layer_rows.md" > "$OUT/layer_rows.log" 2>&1
    grep -E "^\| (prefill|decode)" "$OUT/layer_rows.md"
    ;;
  three)  # the three-launch transform everywhere: graph timings should drop (less GPU time), eager rise
    DUQUANT_FUSED_TRANSFORM=0 timeout 560 "${bench[@]}" --level layer --variants bf16 w4a4_fp8w_fused \
      --out-json "$OUT/layer_three.json" --out-md "$OUT/layer_three.md" > "$OUT/layer_three.log" 2>&1
    grep -E "^\| (prefill|decode)" "$OUT/layer_three.md"
    ;;
  *)
    echo "usage: OUT=\$OUT bash scripts/gpu_issue4.sh {parity|parity-rest|kernel|quantize|decode|pdl|calib-real|layer|e2e|rows|three}"; exit 2
    ;;
esac
