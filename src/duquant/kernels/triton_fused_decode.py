"""A decode linear in one launch: the DuQuant transform + quantize and the W4 GEMV that reads
its codes (the transform inside the decode GEMV).

At decode a linear layer is two short kernels in a row: the whole-row transform
(`triton_row_transform`, ~5 µs for one token of 4096 channels on an H100, mostly latency)
and the GEMV over the packed weight (`triton_decode.w4a8_gemv_joined`, ~5 µs for 4096²).
Each pays its own launch and ramp, and the GEMV's weight stream waits for the transform. Here
one grid holds both:

* programs 0 … P − 1 are producers, one per token tile (`transform_rows`, exactly the rows
  kernel's code): they write the codes and the per-token scales, then count up a flag
  (release, after a CTA barrier);
* the other programs are the GEMV's (`gemv_program`, exactly the joined GEMV's code): each
  loads its first weight tile, spins until the flag reaches P (acquire), then reads the codes
  through L2 and runs as usual (split-K partial sums and all).

So the weight stream starts with the transform instead of after it, and the step has one
launch. Programs can wait on the producers only because the producers started first: the
GPU hands out a grid's programs in order of their index (the premise of single-pass scans
with decoupled look-back), and the producers have the lowest ones; they never wait on
anything. The flag and an exit counter return to zero at the end of every launch (the last
program out resets them), so the kernel needs no memset and can be captured in a CUDA graph.

The codes equal the rows kernel's and the output equals `w4a8_gemv_joined` of them (the same
code on the same inputs; with split-K the fp32 partial sums may add in another order).

Measured on the H100 (session 13, results/kernels/session13/): slower than the two launches for
every decode group of LLaMA-2-7B at M = 1…16 and every setting tried (first weight tile loaded
before the wait or not, a sleep of 0/200/1000 ns between polls, 1/2/4 GEMV programs per SM, a
register cap): o_proj at M = 1 15.3 µs against 12.3, gate/up 37.7 against 25.1. The cause is in
the GEMV half, not the wait: with no transform programs at all the launch still took 12.9 µs
against the GEMV kernel's 7.3 (gate/up 32.1 against 18.7). The transform half needs ~135
registers a thread (the GEMV alone 72 at M = 1), so the launch holds half the GEMV's programs per
SM, and the weight stream, which needs them all in flight, slows down; capping the registers
makes the transform spill and was slower still. So `ops.FUSED_DECODE` is off by default; the
kernel stays, tested, for the record and for GPUs where the balance differs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from duquant.kernels.norm import InputNorm
from duquant.kernels.triton_decode import (
    READY_AT_COUNT,
    gemv_launch,
    gemv_program,
    gemv_warps,
)
from duquant.kernels.triton_row_transform import row_tile, rows_launch, transform_rows


@triton.jit(do_not_specialize=["split_k", "tiles_per_split", "N", "N1", "N2", "T1", "T2", "PRODUCERS", "PROGRAMS"])
def transform_gemv_kernel(
    # the producers' transform (`transform_rows`)
    x_ptr, smooth_ptr, rot1_ptr, perm_ptr, rot2_ptr, scratch_ptr, codes_ptr, scale_ptr, norm_w_ptr, up_ptr,
    M, K, NB, stride_xm, stride_cm, clip, qmax, eps,
    # the GEMV (`gemv_program`): a_ptr and sx_ptr are codes_ptr and scale_ptr seen as its operands
    a_ptr, w_ptr, w2_ptr, w3_ptr, sx_ptr, sw_ptr, zw_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr,
    M2, N, N1, N2, T1, T2, KW, stride_a, stride_w, stride_om, split_k, tiles_per_split,
    # the flag the producers count up [0] and the exit counter [1]
    sync_ptr, PRODUCERS, PROGRAMS,
    RB: tl.constexpr, NB_PAD: tl.constexpr, T: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_R1: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_R2: tl.constexpr, PRECISE: tl.constexpr, SYMMETRIC: tl.constexpr,
    HAS_NORM: tl.constexpr, NORM_W: tl.constexpr, GATED: tl.constexpr, RECIP: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, SEGMENTS: tl.constexpr,
    PRELOAD: tl.constexpr = True, BACKOFF_NS: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    if pid < PRODUCERS:
        transform_rows(pid, x_ptr, smooth_ptr, rot1_ptr, perm_ptr, rot2_ptr, scratch_ptr, codes_ptr, scale_ptr,
                       norm_w_ptr, up_ptr, M, K, NB, stride_xm, stride_cm, clip, qmax, eps, RB, NB_PAD, T, HAS_SMOOTH,
                       HAS_R1, HAS_PERM, HAS_R2, PRECISE, SYMMETRIC, HAS_NORM, NORM_W, GATED, RECIP, EVEN)
        tl.debug_barrier()  # every thread's codes are written before the one release below
        tl.atomic_add(sync_ptr, 1, sem="release")
    else:
        g = pid - PRODUCERS
        row_blocks = (PROGRAMS - PRODUCERS) // split_k
        gemv_program(g % row_blocks, g // row_blocks, a_ptr, w_ptr, w2_ptr, w3_ptr, sx_ptr, sw_ptr, zw_ptr, bias_ptr,
                     out_ptr, ws_ptr, cnt_ptr, M2, N, N1, N2, T1, T2, KW, stride_a, stride_w, stride_om, split_k,
                     tiles_per_split, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, HAS_BIAS, EVEN_K, ALIGNED, SEGMENTS,
                     READY_AT_COUNT, sync_ptr, PRODUCERS, PRELOAD, BACKOFF_NS)
    # the last program out resets the flag and this counter for the next launch
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == PROGRAMS - 1:
        tl.atomic_xchg(sync_ptr, 0)
        tl.atomic_xchg(sync_ptr + 1, 0)


def default_warps(k: int, n: int, m: int) -> int:
    """The launch's warps with default tiles: the larger of the rows transform's and the GEMV's."""
    return max(row_tile(k, n, m)[2], gemv_warps(m))


# The flag and exit counter, zero between launches (see the module docstring). One per device:
# launches must not overlap (one stream, as in decoding). Allocate before a CUDA-graph capture
# (the first call does): memory allocated while capturing is zeroed only when the graph replays.
_SYNC: dict[torch.device, torch.Tensor] = {}


def _sync(device: torch.device) -> torch.Tensor:
    buf = _SYNC.get(device)
    if buf is None:
        buf = torch.zeros(2, dtype=torch.int32, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _SYNC[device] = buf
    return buf


def transform_gemv(x: torch.Tensor, rot1: torch.Tensor | None, perm: torch.Tensor | None, rot2: torch.Tensor | None,
                   smooth: torch.Tensor | None, packed: list[torch.Tensor], w_scale: torch.Tensor,
                   w_zero: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 4, clip: float = 0.9,
                   out_dtype: torch.dtype = torch.bfloat16, precise: bool = False, symmetric: bool = False,
                   norm: InputNorm | None = None, up: torch.Tensor | None = None, fast_quant: bool | None = None,
                   warps: int | None = None, config: dict[str, int] | None = None, preload: bool = True,
                   backoff_ns: int = 0, max_regs: int | None = None, skip_transform: bool = False,
                   **tune: int) -> torch.Tensor:
    """y [M, ΣN_i] = `w4a8_gemv_joined(*duquant_quantize_rows(x, …), packed, …)` in one launch.

    x [..., K] (M ≤ `triton_decode.GEMV_MAX_M` tokens); the transform's arguments as for
    `duquant_quantize_rows`, the GEMV's as for `w4a8_gemv_joined` (1–3 packed weights [N_i, K/2]
    stacked along N; scale, zero point and bias over the stacked rows). warps: the launch's
    (default: the larger of what the transform and the GEMV each take); tune/config: the
    GEMV's tiles (`gemv_config`)."""
    rows = rows_launch(x, rot1, perm, rot2, smooth, bits, clip, torch.int8, precise, symmetric=symmetric, norm=norm,
                       up=up, fast_quant=fast_quant)
    gemv = gemv_launch(rows.codes, rows.scale, packed, w_scale, w_zero, bias, out_dtype, config, **tune)
    if gemv.args[0].data_ptr() != rows.codes.data_ptr():  # the GEMV would read a copy made before the codes
        raise ValueError("the fused decode GEMV must read the transform's codes in place")
    meta = dict(gemv.meta)
    gemv_warps = meta.pop("num_warps")
    rows_meta = dict(rows.meta)
    rows_meta["RB"] = rows_meta.pop("N")
    producers = 0 if skip_transform else rows.programs
    programs = producers + gemv.row_blocks * gemv.split_k
    transform_gemv_kernel[(programs,)](
        *rows.args, *gemv.args, _sync(x.device), producers, programs, **rows_meta, **meta,
        PRELOAD=preload, BACKOFF_NS=backoff_ns, num_warps=warps or max(rows.warps, gemv_warps),
        **({"maxnreg": max_regs} if max_regs else {}),
    )
    return gemv.out
