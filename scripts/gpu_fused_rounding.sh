#!/usr/bin/env bash
# Session 12, first device call (it may carry .carry/smollm2-a for a SmolLM2 call right after):
# the GPU tests of the fused-input rounding (norm, SwiGLU, the RMSNorm kernel, the PDL chains),
# the transform at small M (rows kernel, tokens per program and warps, against tiles) and at
# prefill M = 2048 / 8192 with the linear table.
#   OUT=$OUT bash scripts/gpu_fused_rounding.sh
# Lands in $OUT: gpu.txt, pytest_fused_rounding.log, transform_small_m.{json,md}, transform_prefill.{json,md}.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # $OUT, PYTHONPATH, $bench, gpu.txt
python3 -m pytest -q tests/test_kernels_gpu.py -k "fused_rms_norm or fused_swiglu or fused_input_rounded or rms_norm_on_gpu or transform_then_gemv_with_pdl or one_launch_transform" 2>&1 | tail -6 | tee "$OUT/pytest_fused_rounding.log"
python3 scripts/transform_prefill.py --small-m --out-json "$OUT/transform_small_m.json" --out-md "$OUT/transform_small_m.md" 2>&1 | grep -v "^|" | tail -3
python3 scripts/transform_prefill.py --ms 2048 8192 --out-json "$OUT/transform_prefill.json" --out-md "$OUT/transform_prefill.md" 2>&1 | grep -v "^|" | tail -3
