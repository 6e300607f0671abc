#!/usr/bin/env bash
# One full GPU experiment for duquant.kernels: parity tests, then the benchmark.
# Usage (device machine, repo root): PYTHONPATH=src bash scripts/gpu_kernels.sh [bench args]
# Everything lands in $OUT (default ./out): gpu.txt, pytest.log, bench.log, kernels.json, kernels.md.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# Until duquant.transforms.hadamard lands, stub it so `import duquant` works (kernels don't use it).
if [ ! -f src/duquant/transforms/hadamard.py ]; then
  shim=$(mktemp -d)
  cat >"$shim/sitecustomize.py" <<'PY'
import sys, types
m = types.ModuleType("duquant.transforms.hadamard")
def _missing(*a, **k): raise NotImplementedError("duquant.transforms.hadamard is not written yet")
m.__getattr__ = lambda name: (_ for _ in ()).throw(AttributeError(name)) if name.startswith("__") else _missing
sys.modules["duquant.transforms.hadamard"] = m
PY
  export PYTHONPATH=$shim:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/gpu.txt"
timeout 210 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py tests/test_kernels_reference.py \
  >"$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|Error" "$OUT/pytest.log" | tail -15
timeout 250 python3 -m duquant.bench.kernels --out-json "$OUT/kernels.json" --out-md "$OUT/kernels.md" "$@" \
  2>&1 | tee "$OUT/bench.log" | grep -E "^\||^GPU|Error|error" | head -60
