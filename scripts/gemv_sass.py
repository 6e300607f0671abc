"""Compile the dp4a decode GEMV (duquant.kernels.triton_decode.w4a8_gemv_kernel) for sm_90
without a GPU (Triton's bundled ptxas/nvdisasm) and print, per configuration: registers,
spill stack, shared memory, and the main loop's instructions and dp4a per packed weight
byte. This is where the cost figures in the kernel's docstring come from.

    PYTHONPATH=src python scripts/gemv_sass.py                   # the default tile of each M
    PYTHONPATH=src python scripts/gemv_sass.py 8,32,1024,4,3     # M,BLOCK_N,BLOCK_K,warps,stages
    PYTHONPATH=src python scripts/gemv_sass.py 1,32,1024,4,3,3   # ... and 3 joined weights (q/k/v)
    PYTHONPATH=src python scripts/gemv_sass.py 1,32,1024,4,3,3,1 # ... launched with PDL (L2 prefetch + wait)
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from duquant.kernels.triton_decode import gemv_config, w4a8_gemv_kernel

SIGNATURE = {
    "a_ptr": "*i32", "w_ptr": "*i32", "w2_ptr": "*i32", "w3_ptr": "*i32", "sx_ptr": "*fp32", "sw_ptr": "*fp32",
    "zw_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32",
    "N": "i32", "N1": "i32", "N2": "i32", "T1": "i32", "T2": "i32", "KW": "i32", "stride_a": "i32",
    "stride_w": "i32", "stride_om": "i32", "split_k": "i32", "tiles_per_split": "i32", "BLOCK_M": "constexpr",
    "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "NUM_STAGES": "constexpr", "HAS_BIAS": "constexpr",
    "EVEN_K": "constexpr", "ALIGNED": "constexpr", "SEGMENTS": "constexpr", "PDL": "constexpr",
}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_body(sass: str) -> list[str]:
    """Instructions of the backward-branch loop with the most dp4a (the K loop)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if re.match(r"^\s+/\*[0-9a-f]+\*/", x)]
            if sum("IDP" in x for x in body) > sum("IDP" in x for x in best):
                best = body
    return best


def inspect(m: int, block_n: int, block_k: int, warps: int, stages: int, segments: int = 1, pdl: int = 0,
            k: int = 4096, n: int = 4096) -> str:
    const = {"BLOCK_M": triton.next_power_of_2(m), "BLOCK_N": block_n, "BLOCK_K": block_k, "NUM_STAGES": stages,
             "HAS_BIAS": True, "EVEN_K": (k // 8) % (block_k // 8) == 0, "ALIGNED": k % 32 == 0,
             "SEGMENTS": segments, "PDL": bool(pdl)}
    names = list(SIGNATURE)
    values = {"N": n, "KW": k // 8, "stride_a": k // 16, "stride_w": k // 32, "stride_om": n}
    div16 = [x for x in names if SIGNATURE[x].startswith("*")] + [x for x, v in values.items() if v % 16 == 0]
    src = ASTSource(fn=w4a8_gemv_kernel, signature=SIGNATURE,
                    constexprs={(names.index(x),): v for x, v in const.items()},
                    attrs={(names.index(x),): [["tt.divisibility", 16]] for x in div16})
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "launch_pdl": bool(pdl)})
    ptx = c.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    body = loop_body(sass)
    per_thread = block_n * block_k // 2 // (32 * warps)  # packed bytes per thread per tile
    idp = sum("IDP" in x for x in body)
    return (f"M={m:2d} segments={segments} pdl={pdl} BLOCK_N={block_n:3d} BLOCK_K={block_k:4d} warps={warps} "
            f"stages={stages}: regs {regs}, stack {stack}, smem {c.metadata.shared} B; loop {len(body)} instr, {idp} dp4a "
            f"for {per_thread} B/thread -> {len(body) / per_thread:.2f} instr/B, {idp / per_thread:.2f} dp4a/B; PTX: "
            f"{ptx.count('prefetch.global.L2')} L2 prefetch, {ptx.count('cp.async.bulk.prefetch.L2')} bulk L2 prefetch, "
            f"{ptx.count('griddepcontrol.wait')} griddepcontrol.wait")


def main(argv: list[str]) -> int:
    if argv:
        configs = [tuple(int(v) for v in arg.split(",")) for arg in argv]
    else:
        configs = []
        for m in (1, 2, 4, 8, 16):
            c = gemv_config(m, 4096, 4096, 132)
            configs.append((m, c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["NUM_STAGES"]))
    for cfg in configs:
        print(inspect(*cfg), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
