"""Issue 3: QuaRot and DuQuant, RTN and GPTQ weights, in the DuQuant and the QuaRot setting.

Registers two suites in results_table.py (same model loading, calibration, evaluation, one
JSON per run and a markdown table with the quantization wall time) and runs it:

    python scripts/issue3_suite.py --model smollm2-135m --suite issue3-duquant --out results/issue3-duquant
    python scripts/issue3_suite.py --model smollm2-135m --suite issue3-quarot --out results/issue3-quarot

In both settings "w4a4" quantizes the linear layers' weights and inputs only (Q, K, V in 16
bit) and "w4a4kv4" adds the attention operands at 4 bit: in the DuQuant setting that is Q, K
and V (the DuQuant paper's W4A4), in the QuaRot setting K and V (Q stays in 16 bit, QuaRot's
W4A4KV4).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import results_table  # noqa: E402

from duquant.config import preset_settings  # noqa: E402

METHODS = {  # run-name part -> (method, weight quantizer)
    "quarot-rtn": ("quarot", "rtn"),
    "quarot-gptq": ("quarot", "gptq"),
    "duquant": ("duquant", "rtn"),
    "duquant-gptq": ("duquant", "gptq"),
}


def suite(preset: str, with_fp: bool) -> dict:
    runs: dict = {"fp": None} if with_fp else {}
    linears_only = dict(qkv_bits=16, kv_bits=None)  # Q, K, V in 16 bit
    with_kv = dict(qkv_bits=None, kv_bits=4)
    for kv_name, kv in (("w4a4", linears_only), ("w4a4kv4", with_kv)):
        for name, (method, rounding) in METHODS.items():
            settings = preset_settings(preset) | kv | dict(method=method, weight_quantizer=rounding)
            runs[f"{preset}-setting-{name}-{kv_name}"] = settings
    return runs


results_table.SUITES["issue3-duquant"] = suite("duquant", with_fp=True)
results_table.SUITES["issue3-quarot"] = suite("quarot", with_fp=False)

if __name__ == "__main__":
    results_table.main()
