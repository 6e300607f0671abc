"""Compile the transform kernels, the decode GEMV with the transform inside it and the decode
attention kernels for sm_90 without a GPU (Triton's bundled ptxas) and print registers, spill
stack and shared memory per variant: a variant that needs more than the H100's 227 KB of shared
memory, or spills, shows here before any GPU time is spent.

    PYTHONPATH=src python scripts/kernel_resources.py [--only attention fused_decode tiles rows]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from duquant.kernels.triton_decode import gemv_config
from duquant.kernels.triton_decode_attention import (
    BLOCK_N,
    decode_attention_group_kernel,
    decode_attention_split_kernel,
)
from duquant.kernels.triton_fused_decode import default_warps, transform_gemv_kernel
from duquant.kernels.triton_row_transform import row_tile, row_transform_quant_kernel
from duquant.kernels.triton_transform import transform_quant_kernel

SMEM_LIMIT = 232448  # bytes per block on an H100 (opt-in maximum)


def _signature(fn, pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    return {name: ("constexpr" if name in constexprs else pointers.get(name, "i32")) for name in fn.arg_names}


def compile_sm90(fn, pointers: dict[str, str], constexprs: dict[str, object], warps: int,
                 floats: tuple[str, ...] = ()) -> str:
    sig = _signature(fn, pointers, constexprs)
    for name in floats:
        sig[name] = "fp32"
    names = list(sig)
    divisible = [n for n in names if sig[n].startswith("*")]
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
    try:
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except Exception as e:  # noqa: BLE001 - report and go on with the next variant
        return f"does not compile: {type(e).__name__}: {str(e)[:160]}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    smem = c.metadata.shared
    flag = "  <-- over the shared-memory limit" if smem > SMEM_LIMIT else ("  <-- spills" if int(stack) else "")
    return f"regs {regs}, stack {stack}, smem {smem} B{flag}"


def tiles(n: int, block_m: int, stage: int, precise: bool, warps: int = 4, norm: bool = False,
          gated: bool = False) -> str:
    ptr = {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "rot1_ptr": "*fp32" if precise else "*bf16", "dest_ptr": "*i32",
           "vt_ptr": "*fp32" if precise else "*bf16", "rot2t_ptr": "*fp32" if precise else "*bf16", "srow_ptr": "*i32",
           "ocol_ptr": "*i32", "rowmin_ptr": "*fp32", "rowmax_ptr": "*fp32", "out_ptr": "*fp8e4nv",
           "scale_ptr": "*fp32", "sync_ptr": "*i32", "norm_w_ptr": "*bf16", "rinv_ptr": "*fp32",
           "up_ptr": "*bf16"}
    const = dict(N1=n, N2=n, KC=n, BLOCK_M=block_m, SUB=1, HAS_SMOOTH=not norm, HAS_R1=True, HAS_DEST=True,
                 HAS_R2=True, HAS_MAP=False, PRECISE=precise, STAGE=stage, SYMMETRIC=False, HAS_NORM=norm, NORM_W=norm,
                 GATED=gated)
    return compile_sm90(transform_quant_kernel, ptr, const, warps, ("post_scale", "clip", "qmax"))


def rows(k: int, n: int, precise: bool, norm: bool = False, gated: bool = False) -> str:
    nb_pad, t, warps = row_tile(k, n)
    ptr = {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "rot1_ptr": "*fp32" if precise else "*bf16", "perm_ptr": "*i32",
           "rot2_ptr": "*fp32" if precise else "*bf16", "scratch_ptr": "*fp32" if precise else "*bf16",
           "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "norm_w_ptr": "*bf16", "up_ptr": "*bf16"}
    const = dict(N=n, NB_PAD=nb_pad, T=t, HAS_SMOOTH=not norm, HAS_R1=True, HAS_PERM=True, HAS_R2=True,
                 PRECISE=precise, SYMMETRIC=False, HAS_NORM=norm, NORM_W=norm, GATED=gated)
    return f"T={t} NB_PAD={nb_pad} warps={warps}: " + compile_sm90(row_transform_quant_kernel, ptr, const, warps,
                                                                   ("clip", "qmax", "eps"))


def fused_decode(m: int, k: int, n: int, rows_n: int, norm: bool = False, gated: bool = False,
                 warps: int | None = None) -> str:
    """triton_fused_decode.transform_gemv_kernel for m tokens, K = k, rotation block n, one weight of rows_n rows."""
    nb_pad, t, _ = row_tile(k, n, m)
    cfg = gemv_config(m, rows_n, k, 132)
    for name in ("num_warps", "split_k", "tiles_per_split"):
        cfg.pop(name)
    warps = warps or default_warps(k, n, m)
    ptr = {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "rot1_ptr": "*bf16", "perm_ptr": "*i32", "rot2_ptr": "*bf16",
           "scratch_ptr": "*fp32", "codes_ptr": "*i8", "scale_ptr": "*fp32", "norm_w_ptr": "*bf16", "up_ptr": "*bf16",
           "a_ptr": "*i32", "w_ptr": "*i32", "w2_ptr": "*i32", "w3_ptr": "*i32", "sx_ptr": "*fp32", "sw_ptr": "*fp32",
           "zw_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
           "sync_ptr": "*i32"}
    const = dict(RB=n, NB_PAD=nb_pad, T=t, HAS_SMOOTH=False, HAS_R1=True, HAS_PERM=True, HAS_R2=True, PRECISE=False,
                 SYMMETRIC=False, HAS_NORM=norm, NORM_W=norm, GATED=gated, RECIP=True, EVEN=nb_pad == k // n,
                 HAS_BIAS=False, EVEN_K=True, ALIGNED=True, SEGMENTS=1, **cfg)
    return f"warps={warps}: " + compile_sm90(transform_gemv_kernel, ptr, const, warps, ("clip", "qmax", "eps"))


_TORCH_TO_SIG = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}


def attention(grouped: bool, dtype: str, d: int, gp: int = 16) -> str:
    """A decode attention kernel for a query of `dtype` ("bfloat16", "float16", "float32"), head
    dim d; grouped: `decode_attention_group_kernel` with GP query rows, else the per-head one."""
    import triton.language as tl
    ptr = {"q_ptr": _TORCH_TO_SIG[dtype], "kc_ptr": "*u8", "ks_ptr": "*fp32", "kz_ptr": "*fp32", "vc_ptr": "*u8",
           "vs_ptr": "*fp32", "vz_ptr": "*fp32", "mask_ptr": "*i1", "m_ptr": "*fp32", "l_ptr": "*fp32",
           "acc_ptr": "*fp32"}
    const = dict(D=d, BLOCK_N=BLOCK_N, HAS_MASK=True, OUT_DTYPE=getattr(tl, dtype))
    if grouped:
        const["GP"] = gp
        fn = decode_attention_group_kernel
    else:
        const.update(FOLD=True, STAGES=1, DOT=True)
        fn = decode_attention_split_kernel
    return compile_sm90(fn, ptr, const, 4, ("scaling",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=["attention", "fused_decode", "tiles", "rows"],
                        default=["attention", "fused_decode", "tiles", "rows"])
    only = set(parser.parse_args().only)
    if "attention" in only:
        for dtype in ("bfloat16", "float16", "float32"):
            for d in (64, 128):
                for grouped in (False, True):
                    kind = "grouped GP=16" if grouped else "per query head"
                    print(f"decode attention {dtype} D={d} {kind}: {attention(grouped, dtype, d)}", flush=True)
    if "fused_decode" in only:
        _fused_decode_variants()
    if "tiles" in only:
        _tiles_variants()
    if "rows" in only:
        _rows_variants()


def _fused_decode_variants() -> None:
    for m in (1, 4, 8):
        for k, n, rows_n, norm, gated in ((4096, 128, 4096, True, False), (4096, 128, 4096, False, False),
                                          (11008, 128, 4096, False, True)):
            print(f"fused decode M={m} K={k} N={rows_n} norm={norm} swiglu={gated}: "
                  f"{fused_decode(m, k, n, rows_n, norm, gated)}", flush=True)
    for m, k, gated in ((1, 4096, False), (1, 11008, True)):
        for warps in (4, 8):
            print(f"fused decode M={m} K={k} swiglu={gated}: {fused_decode(m, k, 128, 4096, gated=gated, warps=warps)}",
                  flush=True)


def _tiles_variants() -> None:
    for precise in (False, True):
        for stage in (0, 1, 2, 3):
            print(f"tiles n=128 BLOCK_M=64 stage={stage} precise={precise}: {tiles(128, 64, stage, precise)}", flush=True)
    for stage in (0, 1, 2, 3):  # with the RMSNorm fused (kernels.norm), fast mode
        print(f"tiles+norm n=128 BLOCK_M=64 stage={stage}: {tiles(128, 64, stage, False, norm=True)}", flush=True)
    for stage in (0, 1):  # with SwiGLU fused (stage 1 reads gate and up)
        print(f"tiles+swiglu n=128 BLOCK_M=64 stage={stage}: {tiles(128, 64, stage, False, gated=True)}", flush=True)


def _rows_variants() -> None:
    for k, n in ((4096, 128), (11008, 128), (1536, 128), (576, 64)):
        for precise in (False, True):
            print(f"rows K={k} n={n} precise={precise}: {rows(k, n, precise)}", flush=True)
    print(f"rows+norm K=4096 n=128: {rows(4096, 128, False, norm=True)}", flush=True)
    print(f"rows+swiglu K=11008 n=128: {rows(11008, 128, False, gated=True)}", flush=True)


if __name__ == "__main__":
    main()
