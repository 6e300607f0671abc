"""Entry points the model calls. Each picks a Triton kernel for CUDA tensors and falls
back to the pure-PyTorch reference on CPU or where Triton is missing (CI is CPU-only:
nothing here imports Triton until a CUDA tensor arrives).

Shapes: x [..., K] bf16; a [..., K] int8 or float8_e4m3fn holding q − z ∈ [−15, 15];
s_x float32 [...] (one scale per token); y [..., N] bf16.
"""
from __future__ import annotations

import functools
import os

import torch

from duquant.kernels import reference as ref
from duquant.kernels import dependent_launch
from duquant.kernels.norm import InputNorm, check_one_fused_op, rms_norm_ref, swiglu_ref
from duquant.kernels.weight import PackedWeight
from duquant.quant.quantizer import MIN_SCALE, QuantSpec, fake_quantize

# Largest token count served by the packed-weight decode kernels; above it the 8-bit prefill
# GEMM runs (packed weights expanded per call unless an FP8 copy is kept). H100, session 14
# (results/bench_h100/session14/decode_chains_max{16,64}.md, a layer's decode linear groups with
# their transforms, CUDA graph): at M = 32 / 64 the MMA kernel against the prefill path took q/k/v
# 38.5 / 44.0 against 73.8 / 73.2 µs, gate/up 50.5 / 64.9 against 103.6 / 99.9, o and down also
# faster; the 7B layer's decode at batch 32 / 64 went from 0.96 / 0.98× BF16 to 1.23 / 1.11×. So
# the kernel's own limit, 64; DUQUANT_DECODE_MAX_M lowers it.
DECODE_MAX_M = min(64, int(os.environ.get("DUQUANT_DECODE_MAX_M", "64")))
# Up to this M the decode path is the dp4a GEMV (triton_decode.w4a8_gemv, kernel limit 16);
# above it, the int8-MMA decode kernel (triton_decode.w4a8_decode). The GEMV's dp4a work grows
# with M, the MMA kernel is flat. H100, each decode linear group with its transform as the model
# runs it (results/bench_h100/session14/decode_chains_gemv{8,4}.md, CUDA-graph µs, GEMV up to 8
# / up to 4 tokens): at M = 6 q/k/v 27.9 / 25.6, o 16.9 / 15.0, gate/up 36.2 / 38.0, down 30.3 /
# 29.1 (a layer's four: 111.3 / 107.7); at M = 8 110.8 / 106.5; at M = 4 the GEMV (session 14
# kernel bench: 4096² 7.8 against the MMA kernel's 9.7 µs). So 4; DUQUANT_GEMV_MAX_M overrides.
DECODE_GEMV_MAX_M = int(os.environ.get("DUQUANT_GEMV_MAX_M", "4"))
# v1 of the fused Hadamard kernel failed parity on H100; v2 (the three-launch pipeline of
# triton_transform) replaced it. DUQUANT_HADAMARD_KERNEL=0 sends hadamard_quantize to the
# reference on every device.
HADAMARD_KERNEL_VERIFIED = os.environ.get("DUQUANT_HADAMARD_KERNEL", "1") == "1"
# Kernel of the DuQuant transform: "tiles" (triton_transform: (token tile × block) programs,
# one or three launches) or "rows" (triton_row_transform: whole rows per program, the blocks
# as the MMA's M dimension). H100, CUDA-graph µs per call:
#   small M (results/kernels/session12/transform_small_m.md; tiles / rows with one token per
#   program, 4 warps): K = 4096, M = 1…64: 8.1–9.2 / 5.2–5.5 (RMSNorm fused: 10.5–12.2 /
#   5.6–5.9); K = 11008 with the SwiGLU (the rows tile pads 86 blocks to 128, 8 warps):
#   M = 1…16: 10.8–11.1 / 12.0–12.3, M = 64: 14.3 / 12.4, M = 256: 30.9 / 23.5;
#   prefill (session11/transform_prefill.md, both with reciprocal codes): K = 4096,
#   M = 2048 / 8192 / 32768: tiles 45.9 / 160.4 / 588.9, rows 30.4 / 104.9 / 398.6 (RMSNorm
#   fused: 49.0 / 165.0 / 605.5 against 34.6 / 122.4 / 465.3); K = 11008 with the SwiGLU:
#   tiles 134 / 466 / 1850, rows 197 / 725 / 2897.
# So "auto" (the default) takes rows when K ≤ ROWS_MAX_K and K/n is a power of two (no
# padded blocks), or for one token (ROWS_MAX_M); for wider rows (K > ROWS_MAX_K, up to
# ROWS_MAX_TILE padded elements) from ROWS_WIDE_MIN_M to ROWS_WIDE_MAX_M tokens; tiles
# everywhere else. DUQUANT_TRANSFORM_KERNEL=tiles or =rows forces one kernel.
TRANSFORM_KERNEL = os.environ.get("DUQUANT_TRANSFORM_KERNEL", "auto")
ROWS_MAX_M = int(os.environ.get("DUQUANT_ROWS_MAX_M", "1"))
ROWS_MAX_K = int(os.environ.get("DUQUANT_ROWS_MAX_K", "4096"))
ROWS_WIDE_MIN_M = 16  # exclusive: up to 16 tokens the tiles kernel takes the wide rows
ROWS_WIDE_MAX_M = 256
ROWS_MAX_TILE = 16384  # one token's padded [NB_PAD, n] tile; K = 11008 takes 128 × 128


def padded_row(k: int, n: int) -> int:
    """Elements of one token's tile in the rows kernel: k/n blocks of n, padded to a power of two."""
    return (1 << (k // n - 1).bit_length()) * n


def transform_kernel(m: int, k: int, n: int = 128) -> str:
    """Which DuQuant transform kernel runs for m tokens of k channels in n-wide rotation
    blocks: "tiles" or "rows"."""
    if TRANSFORM_KERNEL != "auto":
        return TRANSFORM_KERNEL
    if k > ROWS_MAX_K:
        wide_ok = padded_row(k, n) <= ROWS_MAX_TILE
        return "rows" if wide_ok and ROWS_WIDE_MIN_M < m <= ROWS_WIDE_MAX_M else "tiles"
    return "rows" if m <= ROWS_MAX_M or padded_row(k, n) == k else "tiles"


# The attention operands (Q, K, V per token and head: Hadamard + quantizer, KV-cache writes and
# reads) run through triton_kv_quant on CUDA; DUQUANT_KV_KERNEL=0 keeps PyTorch's ops.
KV_KERNEL = os.environ.get("DUQUANT_KV_KERNEL", "1") == "1"
# A one-token step over a StaticQuantizedKVCache attends straight from the 4-bit codes
# (triton_decode_attention); DUQUANT_DECODE_ATTENTION=0 dequantizes the cache and runs SDPA.
DECODE_ATTENTION_KERNEL = os.environ.get("DUQUANT_DECODE_ATTENTION", "1") == "1"
# Carrier of the prefill GEMM: "fp8" (cuBLAS _scaled_mm) or "int8" (Triton). Chosen from
# results/kernels (the faster one on H100 at LLaMA-2-7B shapes).
PREFILL_CARRIER = "fp8"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install must not break CPU users
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """True for CUDA tensors when Triton imports; DUQUANT_TRITON_INTERPRET=1 also sends CPU
    tensors to the kernels (with TRITON_INTERPRET=1, for testing without a GPU)."""
    if not triton_available():
        return False
    return t.is_cuda or os.environ.get("DUQUANT_TRITON_INTERPRET") == "1"


def act_dtype(m: int) -> torch.dtype:
    """Carrier the transform should emit for a GEMM over m tokens (what `w4a4_linear` wants)."""
    if m > DECODE_MAX_M and m % 16 == 0 and PREFILL_CARRIER == "fp8":
        return torch.float8_e4m3fn
    return torch.int8


def _leading(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[:-1])


def fused_input_ref(x: torch.Tensor, norm: InputNorm | None, up: torch.Tensor | None) -> torch.Tensor:
    """What the kernels transform when they absorb the op before them: RMSNorm(x) with
    `norm`, silu(x)·up with `up` (the reference path, and the host path of a layer whose
    transform no kernel covers whole)."""
    check_one_fused_op(norm, up)
    if norm is not None:
        x = rms_norm_ref(x, norm)
    return x if up is None else swiglu_ref(x, up)


def transform_quantize(x: torch.Tensor, rot1: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                       rot2: torch.Tensor | None = None, smooth: torch.Tensor | None = None, bits: int = 4,
                       clip: float = 0.9, out_dtype: torch.dtype | None = None,
                       precise: bool = False, symmetric: bool = False,
                       norm: InputNorm | None = None, up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DuQuant online transform + per-token quantization (asymmetric; symmetric with
    z = 2^(b−1) if asked) of x, of RMSNorm(x) when `norm` is given, of silu(x)·up when
    `up` is given (x is then the gate projection); both fused in the kernel.

    x [..., K] (bf16/fp16/fp32); rot1, rot2 [n, n] (n | K); perm int64 [K]; smooth [K].
    Returns a [..., K] (out_dtype: int8 or float8_e4m3fn; default `act_dtype(M)`) and
    s_x float32 [...]. precise=True: TF32 rotations (else bf16 operands, fp32 accumulate).
    """
    m = x.numel() // x.shape[-1]
    out_dtype = out_dtype or act_dtype(m)
    if use_triton(x):
        from duquant.kernels.triton_transform import rotation_block
        if transform_kernel(m, x.shape[-1], rotation_block(x.shape[-1], rot1, rot2)) == "rows":
            from duquant.kernels.triton_row_transform import duquant_quantize_rows
            a, s = duquant_quantize_rows(x, rot1, perm, rot2, smooth, bits, clip, out_dtype, precise,
                                         symmetric=symmetric, norm=norm, up=up)
        else:
            from duquant.kernels.triton_transform import duquant_quantize
            a, s = duquant_quantize(x, rot1, perm, rot2, smooth, bits, clip, out_dtype, precise, symmetric=symmetric,
                                    norm=norm, up=up)
    else:
        x_in = fused_input_ref(x, norm, up)
        a, s = ref.transform_quantize_ref(x_in, rot1, perm, rot2, smooth, bits, clip, symmetric)
        a = a.to(torch.float32).to(out_dtype) if out_dtype != torch.int8 else a
    return a.reshape(x.shape), s.reshape(_leading(x))


def hadamard_quantize(x: torch.Tensor, had_m: torch.Tensor | None = None, bits: int = 4, clip: float = 0.9,
                      out_dtype: torch.dtype | None = None, precise: bool = False,
                      symmetric: bool = False, norm: InputNorm | None = None,
                      up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """QuaRot online Hadamard (x @ (H_m ⊗ H_p)/√K, had_m the ±1 m×m factor or None) +
    per-token quantization, of RMSNorm(x) with `norm`, of silu(x)·up with `up`. Same
    outputs as `transform_quantize`."""
    m = x.numel() // x.shape[-1]
    out_dtype = out_dtype or act_dtype(m)
    a = None
    if use_triton(x) and HADAMARD_KERNEL_VERIFIED:
        from duquant.kernels.triton_hadamard import hadamard_quantize as _kernel
        try:
            a, s = _kernel(x, had_m, bits, clip, out_dtype, precise, symmetric=symmetric, norm=norm, up=up)
        except ValueError:  # power-of-two part < 16: no tensor-core tiling, use the reference
            a = None
    if a is None:
        a, s = ref.hadamard_quantize_ref(fused_input_ref(x, norm, up), had_m, bits, clip, symmetric)
        a = a.to(torch.float32).to(out_dtype) if out_dtype != torch.int8 else a
    return a.reshape(x.shape), s.reshape(_leading(x))


def _prefill(a: torch.Tensor, s_x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    from duquant.kernels import triton_gemm as g
    fp8_ok = a.shape[0] % 16 == 0 and w.in_features % 16 == 0 and w.out_features % 16 == 0
    carrier = torch.float8_e4m3fn if (a.dtype == torch.float8_e4m3fn and fp8_ok) else torch.int8
    if a.dtype != carrier:
        a = a.to(torch.float32).to(carrier)
    w8 = w.w8 if w.w8 is not None and w.w8.dtype == carrier else g.expand_w4(w.packed, w.zero, carrier)
    if carrier == torch.float8_e4m3fn:
        return g.fp8_gemm(a, s_x, w8, w.scale, bias, out_dtype)
    return g.int8_gemm(a, s_x, w8, w.scale, bias, out_dtype)


def w4a4_linear(a: torch.Tensor, s_x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y = s_x · s_w · (a @ (q_w − z_w)ᵀ) (+ bias): a [..., K] int8/e4m3, s_x float32 [...],
    weight [N, K] packed W4 -> y [..., N]. M ≤ DECODE_MAX_M uses a packed-weight decode
    kernel (the dp4a GEMV up to DECODE_GEMV_MAX_M, else the int8-MMA one); larger M the
    8-bit prefill GEMM (weight.w8, or a transient expansion). The GEMV is launched with
    programmatic dependent launch where the GPU has it (`dependent_launch.DECODE_PDL`)."""
    k = a.shape[-1]
    a2 = a.reshape(-1, k)
    s2 = s_x.reshape(-1).to(torch.float32)
    m = a2.shape[0]
    if not use_triton(a) or weight.group_size:
        y = ref.w4a4_linear_ref(a2.to(torch.float32).to(torch.int8) if a2.dtype != torch.int8 else a2, s2,
                                weight, bias, out_dtype)
    elif m <= DECODE_MAX_M:
        from duquant.kernels import triton_decode as dec
        if m <= DECODE_GEMV_MAX_M and dec.gemv_supported(m, k, weight.packed):
            y = dec.w4a8_gemv(a2, s2, weight.packed, weight.scale, weight.zero, bias, out_dtype,
                              pdl=dependent_launch.DECODE_PDL)
        else:
            y = dec.w4a8_decode(a2, s2, weight.packed, weight.scale, weight.zero, bias, out_dtype)
    else:
        y = _prefill(a2, s2, weight, bias, out_dtype)
    return y.reshape(*a.shape[:-1], weight.out_features)


def joined_decode_kernel(a: torch.Tensor, weights: list[PackedWeight]) -> str | None:
    """Which kernel runs these weights as one launch for activation `a` in `w4a4_linear_joined`:
    "gemv" (the dp4a GEMV, ≤ DECODE_GEMV_MAX_M tokens), "mma" (the int8-MMA decode kernel, up to
    DECODE_MAX_M), or None (not a CUDA decode call with per-channel 4-bit weights of one layout)."""
    m, k = a.numel() // a.shape[-1], a.shape[-1]
    if not (use_triton(a) and m <= DECODE_MAX_M and not any(w.group_size for w in weights)):
        return None
    from duquant.kernels import triton_decode as dec
    packed = [w.packed for w in weights]
    if m <= DECODE_GEMV_MAX_M:
        return "gemv" if dec.joined_gemv_supported(m, k, packed) else None
    return "mma" if dec.joined_decode_supported(m, k, packed) else None


def w4a4_linear_joined(a: torch.Tensor, s_x: torch.Tensor, weights: list[PackedWeight],
                       scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`w4a4_linear` of one activation by several weights (q/k/v, gate/up) stacked along N:
    y [..., ΣN_i]. scale, zero (and bias) are the weights' per-channel vectors concatenated.
    One launch where `joined_decode_kernel` names one, else one `w4a4_linear` per weight."""
    k = a.shape[-1]
    a2, s2 = a.reshape(-1, k), s_x.reshape(-1).to(torch.float32)
    kernel = joined_decode_kernel(a2, weights)
    if kernel is not None:
        from duquant.kernels import triton_decode as dec
        packed = [w.packed for w in weights]
        if kernel == "gemv":
            y = dec.w4a8_gemv_joined(a2, s2, packed, scale, zero, bias, out_dtype, pdl=dependent_launch.DECODE_PDL)
        else:
            y = dec.w4a8_decode_joined(a2, s2, packed, scale, zero, bias, out_dtype)
    else:
        parts, start = [], 0
        for w in weights:
            stop = start + w.out_features
            parts.append(w4a4_linear(a2, s2, w, None if bias is None else bias[start:stop], out_dtype))
            start = stop
        y = torch.cat(parts, dim=-1)
    return y.reshape(*a.shape[:-1], y.shape[-1])


# DUQUANT_FUSED_DECODE=1: a decode linear with the DuQuant transform runs as one launch, the
# transform inside the GEMV (`triton_fused_decode`), up to DECODE_GEMV_MAX_M tokens where the
# rows kernel takes the row whole: K ≤ ROWS_MAX_K with power-of-two blocks, or wider rows whose
# padded tile holds at most FUSED_DECODE_MAX_TILE elements. Off by default: on the H100 it was
# slower than the two launches (transform, then GEMV) for every decode group and setting tried
# (results/kernels/session13/: 0.67–0.85× their speed at the best setting found, M = 1; the
# transform half's registers halve the GEMV's programs per SM).
FUSED_DECODE = os.environ.get("DUQUANT_FUSED_DECODE", "0") == "1"
FUSED_DECODE_MAX_TILE = int(os.environ.get("DUQUANT_FUSED_DECODE_MAX_TILE", "16384"))


def fused_decode_supported(x: torch.Tensor, weights: list[PackedWeight], rot1: torch.Tensor | None,
                           rot2: torch.Tensor | None) -> bool:
    """Whether `fused_decode_linear` serves x [..., K] with these weights and rotations."""
    k = x.shape[-1]
    m = x.numel() // k
    if not (FUSED_DECODE and use_triton(x) and 1 <= m <= DECODE_GEMV_MAX_M
            and not any(w.group_size for w in weights)):
        return False
    from duquant.kernels import triton_decode as dec
    from duquant.kernels.triton_transform import rotation_block
    try:
        padded = padded_row(k, rotation_block(k, rot1, rot2))
    except ValueError:  # blocks that do not tile K: no kernel takes them
        return False
    if not ((k <= ROWS_MAX_K and padded == k) or padded <= FUSED_DECODE_MAX_TILE):
        return False
    return dec.joined_gemv_supported(m, k, [w.packed for w in weights])


def fused_decode_linear(x: torch.Tensor, weights: list[PackedWeight], scale: torch.Tensor, zero: torch.Tensor,
                        bias: torch.Tensor | None, rot1: torch.Tensor | None, perm: torch.Tensor | None,
                        rot2: torch.Tensor | None, bits: int = 4, clip: float = 0.9, symmetric: bool = False,
                        norm: InputNorm | None = None, up: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor | None:
    """`w4a4_linear_joined(*transform_quantize(x, …), weights, …)` as one launch: y [..., ΣN_i]
    (scale, zero and bias over the stacked rows, as there). None where the fused kernel does
    not serve the call (`fused_decode_supported`): the caller runs the two steps."""
    if not fused_decode_supported(x, weights, rot1, rot2):
        return None
    from duquant.kernels.triton_fused_decode import transform_gemv
    y = transform_gemv(x, rot1, perm, rot2, None, [w.packed for w in weights], scale, zero, bias, bits, clip,
                       out_dtype, symmetric=symmetric, norm=norm, up=up)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def duquant_linear(x: torch.Tensor, weight: PackedWeight, rot1: torch.Tensor | None = None,
                   perm: torch.Tensor | None = None, rot2: torch.Tensor | None = None,
                   smooth: torch.Tensor | None = None, bias: torch.Tensor | None = None, bits: int = 4,
                   clip: float = 0.9) -> torch.Tensor:
    """Whole W4A4 DuQuant linear: transform + quantize x, then the W4 GEMM. x [..., K] -> [..., N]."""
    a, s = transform_quantize(x, rot1, perm, rot2, smooth, bits, clip)
    return w4a4_linear(a, s, weight, bias, x.dtype if x.dtype != torch.float32 else torch.bfloat16)


# The simulated quantizer's cast + fake-quant as one Triton kernel on CUDA (bit-exact with the
# PyTorch ops; `triton_fake_quant`). DUQUANT_FAKE_QUANT_KERNEL=0 keeps the PyTorch ops.
FAKE_QUANT_KERNEL = os.environ.get("DUQUANT_FAKE_QUANT_KERNEL", "1") == "1"


def fake_quantize_cast(y: torch.Tensor, spec: QuantSpec | None, dtype: torch.dtype) -> torch.Tensor:
    """fake_quantize(y.to(dtype), spec): what a simulated quantized linear feeds its GEMM."""
    if spec is None:
        return y.to(dtype)
    if FAKE_QUANT_KERNEL and y.is_cuda and triton_available():
        from duquant.kernels import triton_fake_quant as fq
        if fq.supported(y, dtype, spec.group_size):
            return fq.fake_quantize_rows(y, dtype, spec.bits, spec.symmetric, spec.clip, MIN_SCALE)
    return fake_quantize(y.to(dtype), spec)


_KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kv_kernel(x: torch.Tensor, spec: QuantSpec | None, head_dim: int) -> bool:
    if not (KV_KERNEL and spec is not None and use_triton(x)):
        return False
    from duquant.kernels import triton_kv_quant as kv
    return kv.supported(head_dim, spec.bits, spec.group_size)


def _heads_kernel(x: torch.Tensor, spec: QuantSpec | None) -> bool:
    """Whether triton_kv_quant quantizes x [B, H, T, D] (model dtype) with `spec`."""
    return x.dim() == 4 and x.dtype in _KV_DTYPES and _kv_kernel(x, spec, x.shape[-1])


def _hadamard_for(x: torch.Tensor, hadamard: bool) -> torch.Tensor | None:
    """The ±1 matrix triton_kv_quant multiplies x by: in x's dtype if 16-bit (tensor cores), else float32."""
    from duquant.transforms.hadamard import hadamard_on
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return hadamard_on(x.shape[-1], x.device, dtype) if hadamard else None


def fake_quantize_heads(x: torch.Tensor, spec: QuantSpec | None, hadamard: bool) -> torch.Tensor:
    """fake_quantize(apply_hadamard(x) if hadamard else x, spec) in x's dtype, one (scale, zero)
    per (token, head) row of x [B, H, T, D]: the attention operands of the simulated forward."""
    from duquant.transforms.hadamard import apply_hadamard

    if _heads_kernel(x, spec):
        from duquant.kernels import triton_kv_quant as kv
        return kv.fake_quantize_heads(x, _hadamard_for(x, hadamard), spec.bits, spec.symmetric, spec.clip, MIN_SCALE)
    return fake_quantize_cast(apply_hadamard(x) if hadamard else x, spec, x.dtype)


def store_row_codes(x: torch.Tensor, spec: QuantSpec | None, hadamard: bool, parts: tuple[torch.Tensor, ...],
                    position: torch.Tensor) -> None:
    """Write `encode_rows` of x [B, H, T, D] (after the Hadamard) into the cache tensors `parts`
    ([B, H, L, ·], dim 2 the position) at positions position … position + T − 1; position is a
    0-d device tensor (read on the device: a CUDA graph replays the next step)."""
    from duquant.quant.row_codes import encode_rows
    from duquant.transforms.hadamard import apply_hadamard

    if _heads_kernel(x, spec):
        from duquant.kernels import triton_kv_quant as kv
        kv.store_row_codes(x, _hadamard_for(x, hadamard), *parts, position, spec.bits, spec.symmetric, spec.clip,
                           MIN_SCALE)
        return
    at = torch.arange(x.shape[-2], device=position.device) + position
    for part, new in zip(parts, encode_rows(apply_hadamard(x) if hadamard else x, spec)):
        part.index_copy_(2, at, new)


def load_row_codes(parts: tuple[torch.Tensor, ...], spec: QuantSpec | None, head_dim: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The values [B, H, L, head_dim] of cache tensors written by `store_row_codes` (`decode_rows`)."""
    from duquant.quant.row_codes import decode_rows

    if _kv_kernel(parts[0], spec, head_dim):
        from duquant.kernels import triton_kv_quant as kv
        return kv.dequantize_row_codes(*parts, spec.bits, head_dim, dtype)
    return decode_rows(parts, spec, dtype)


def decode_attention_supported(x: torch.Tensor, k_spec: QuantSpec | None, v_spec: QuantSpec | None) -> bool:
    """Whether `decode_attention` can serve the step whose new keys are x [B, H, 1, D]."""
    if not (DECODE_ATTENTION_KERNEL and x.dim() == 4 and x.shape[-2] == 1):
        return False
    if not (_heads_kernel(x, k_spec) and _heads_kernel(x, v_spec)):
        return False
    from duquant.kernels import triton_decode_attention as da
    return all(da.supported(x.shape[-1], spec.bits, spec.group_size) for spec in (k_spec, v_spec))


def decode_attention(query: torch.Tensor, key_parts: tuple[torch.Tensor, ...], value_parts: tuple[torch.Tensor, ...],
                     mask: torch.Tensor | None, scaling: float | None, options: dict) -> torch.Tensor | None:
    """Attention of one query token [B, Hq, 1, D] over a static 4-bit KV cache (the codes of
    `store_row_codes`), as transformers' attention functions return it ([B, 1, Hq, D]); None
    when the call is not one the kernel serves (a mask that is not a boolean [B|1, 1, 1, L],
    soft-capping, attention sinks, dropout): the caller dequantizes and runs SDPA."""
    b, length = query.shape[0], key_parts[0].shape[2]
    if query.shape[2] != 1 or query.dtype not in _KV_DTYPES or any(
            options.get(name) for name in ("softcap", "s_aux", "dropout")):
        return None
    if mask is not None and not (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:] == (1, 1, length)
                                 and mask.shape[0] in (1, b)):
        return None
    from duquant.kernels import triton_decode_attention as da
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return da.decode_attention(query, key_parts, value_parts, mask, scale)


def release_scratch() -> None:
    """Free the kernels' cached scratch buffers and split-K workspaces. They grow to the
    largest call and stay (so repeated calls and CUDA graphs allocate nothing); drop them
    between models, e.g. between benchmark variants, so that one model's scratch does not
    count as the next one's memory. Never while a captured graph that uses them is alive."""
    import sys

    for module_name, cache in (("duquant.kernels.triton_transform", "_BUF"),
                               ("duquant.kernels.triton_decode", "_GEMV_WS"),
                               ("duquant.kernels.triton_decode_attention", "_WORKSPACE")):
        module = sys.modules.get(module_name)  # not imported: nothing cached
        if module is not None:
            getattr(module, cache).clear()
