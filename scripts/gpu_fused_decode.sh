#!/usr/bin/env bash
# Session 13: the transform inside the decode GEMV (triton_fused_decode): its GPU tests, then each
# LLaMA-2-7B decode linear group as two launches and as one (decode_kernels --chains).
#   OUT=$OUT bash scripts/gpu_fused_decode.sh
# Lands in $OUT: gpu.txt, pytest_fused_decode.log, decode_chains.{json,md}. The settings sweep that followed:
#   python3 scripts/fused_decode_sweep.py --out-json ... --out-md ...            (preload × backoff × waves)
#   python3 scripts/fused_decode_sweep.py --preloads 1 --backoffs 200 --waves 2 4 --max-regs 0 72 96
#   python3 scripts/fused_decode_sweep.py --gemv-only --preloads 1 --backoffs 200 --waves 2 4
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # $OUT, PYTHONPATH, $bench, gpu.txt
timeout 300 python3 -m pytest -q tests/test_kernels_gpu.py -k "transform_inside or decode_gemv_joined or decode_gemv_cuda_graph or with_pdl" 2>&1 | tail -6 | tee "$OUT/pytest_fused_decode.log"
python3 scripts/decode_kernels.py --chains --ms 1 4 8 16 --out-json "$OUT/decode_chains.json" --out-md "$OUT/decode_chains.md" 2>&1 | grep -v "^|" | tail -20
