#!/usr/bin/env bash
# One full GPU experiment for duquant.kernels: parity tests, then the benchmarks.
# Usage (device machine, repo root): OUT=$OUT bash scripts/gpu_kernels.sh [kernel bench args]
# Lands in $OUT: gpu.txt, pytest.log, bench.log, kernels.json, kernels.md (+ layer/e2e if LEVELS says so).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
LEVELS=${LEVELS:-kernel}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-170}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
if [ "$TEST_TIMEOUT" != 0 ]; then
  timeout "$TEST_TIMEOUT" python3 -m pytest -v -p no:cacheprovider -rf --tb=line --maxfail=60 \
    -k "${PYTEST_K:-}" tests/test_kernels_gpu.py tests/test_kernels_reference.py ${EXTRA_TESTS:-} >"$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; grep -cE " PASSED" "$OUT/pytest.log"; grep -E " FAILED|passed|failed|^E  |AssertionError" "$OUT/pytest.log" | head -30
fi
for level in $LEVELS; do
  timeout "$BENCH_TIMEOUT" python3 -c "import sys; from duquant.bench import main; sys.exit(main(sys.argv[1:]))" \
    --level "$level" --out-json "$OUT/$level.json" --out-md "$OUT/$level.md" "$@" \
    2>&1 | tee "$OUT/bench_$level.log" | grep -E "^\||^GPU|Error|error|^N=" | head -70
done
