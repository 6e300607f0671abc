"""Pure-PyTorch references for the W4A4 kernels (CPU and CUDA).

Every Triton kernel in this package is tested against the function here that shares its
name stem. The references favour clarity and exactness over speed: transforms run in
float32, the quantization is the shared quantizer's, and the GEMM accumulates in float64
(integer products of 4-bit values are exact there).
"""
from __future__ import annotations

import math

import torch

from duquant.kernels.weight import PackedWeight, prepare_weight, quantize_weight  # noqa: F401 (re-export)
from duquant.quant.packing import unpack_codes
from duquant.quant.quantizer import QuantSpec, compute_qparams, quantize


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def quantize_rows(h: torch.Tensor, bits: int, clip: float,
                  symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantization of float32 rows -> (q − z as int8, scale float32 [M]); asymmetric
    (min/max) or symmetric (abs-max, z = 2^(b−1))."""
    spec = QuantSpec(bits=bits, symmetric=symmetric, clip=clip)
    scale, zero = compute_qparams(h, spec)
    q = quantize(h, scale, zero, spec)
    a = (q.to(torch.float32) - zero).clamp(-128, 127).to(torch.int8)
    return a, scale.squeeze(-1).to(torch.float32)


def block_rotate(h: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Multiply every block of n consecutive columns by the same n×n matrix (x_blk @ rot)."""
    m, k = h.shape
    n = rot.shape[0]
    return (h.reshape(m, k // n, n) @ rot.to(h.dtype)).reshape(m, k)


def duquant_transform_ref(x: torch.Tensor, rot1: torch.Tensor | None, perm: torch.Tensor | None,
                          rot2: torch.Tensor | None, smooth: torch.Tensor | None) -> torch.Tensor:
    """DuQuant's online activation transform in float32: smooth -> R1 -> permute -> R2."""
    h = _as_rows(x).to(torch.float32)
    if smooth is not None:
        h = h / smooth.to(torch.float32)
    if rot1 is not None:
        h = block_rotate(h, rot1)
    if perm is not None:
        h = h[:, perm]
    if rot2 is not None:
        h = block_rotate(h, rot2)
    return h


def transform_quantize_ref(x: torch.Tensor, rot1: torch.Tensor | None, perm: torch.Tensor | None,
                           rot2: torch.Tensor | None, smooth: torch.Tensor | None, bits: int = 4,
                           clip: float = 0.9, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (a = q − z int8 [M, K], per-token scale float32 [M]), M = prod(x.shape[:-1])."""
    return quantize_rows(duquant_transform_ref(x, rot1, perm, rot2, smooth), bits, clip, symmetric)


def sylvester(p: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Unnormalized ±1 Walsh–Hadamard matrix of size p (a power of two), float32."""
    if p & (p - 1):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {p}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(h: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform along the last dim (power-of-two length)."""
    *lead, p = h.shape
    out = h.reshape(-1, p)
    span = 1
    while span < p:
        v = out.reshape(-1, p // (2 * span), 2, span)
        out = torch.stack((v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]), dim=2).reshape(-1, p)
        span *= 2
    return out.reshape(*lead, p)


def hadamard_split(k: int, had_m: torch.Tensor | None) -> tuple[int, int]:
    """(m, p) with K = m·p, p a power of two; m = 1 when no dense factor is given."""
    m = 1 if had_m is None else had_m.shape[0]
    if k % m or (k // m) & (k // m - 1):
        raise ValueError(f"K={k} is not {m}·2^k")
    return m, k // m


def hadamard_transform_ref(x: torch.Tensor, had_m: torch.Tensor | None) -> torch.Tensor:
    """x @ (H_m ⊗ H_p) / √K in float32, H_m a dense ±1 factor (None: m = 1), H_p Sylvester."""
    h = _as_rows(x).to(torch.float32)
    k = h.shape[1]
    m, p = hadamard_split(k, had_m)
    z = fwht(h.reshape(-1, m, p))  # inner factor: X · H_p on each of the m chunks
    if had_m is not None:  # outer factor: y[c, :] = Σ_a H_m[a, c] z[a, :]
        z = torch.einsum("tab,ac->tcb", z, had_m.to(torch.float32))
    return z.reshape(-1, k) / math.sqrt(k)


def hadamard_quantize_ref(x: torch.Tensor, had_m: torch.Tensor | None, bits: int = 4,
                          clip: float = 0.9, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """QuaRot's online Hadamard + per-token quantization -> (a int8 [M, K], scale [M])."""
    return quantize_rows(hadamard_transform_ref(x, had_m), bits, clip, symmetric)


def w4a8_gemm_ref(a: torch.Tensor, s_x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                  w_zero: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                  bits: int = 4, group_size: int = 0) -> torch.Tensor:
    """y[t, j] = s_x[t] · Σ_g s_w[j, g] · Σ_{k∈g} a[t, k] (q_w[j, k] − z_w[j, g])  (+ bias).

    a: int8 (or e4m3 holding integers) [M, K] = q_x − z_x; w_packed: uint8 [N, K/2].
    The integer sums are taken in float64 (exact); scales are applied in float32.
    """
    a64 = _as_rows(a).to(torch.float64)
    codes = unpack_codes(w_packed, bits).to(torch.float64)
    n, k = codes.shape
    if group_size:
        g = k // group_size
        b = codes.reshape(n, g, group_size) - w_zero.reshape(n, g, 1).to(torch.float64)
        part = torch.einsum("tgk,ngk->tng", a64.reshape(-1, g, group_size), b)  # exact integers
        acc = (part.to(torch.float32) * w_scale.reshape(1, n, g).to(torch.float32)).sum(-1)
        y = acc * s_x.reshape(-1, 1).to(torch.float32)
    else:
        acc = (a64 @ (codes - w_zero.reshape(n, 1).to(torch.float64)).T).to(torch.float32)
        y = acc * s_x.reshape(-1, 1).to(torch.float32) * w_scale.reshape(1, n).to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def w4a4_linear_ref(a: torch.Tensor, s_x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`w4a8_gemm_ref` on a `PackedWeight`, keeping the leading dims of `a`."""
    y = w4a8_gemm_ref(a, s_x, weight.packed, weight.scale, weight.zero, bias, out_dtype, weight.bits,
                      weight.group_size)
    return y.reshape(*a.shape[:-1], weight.out_features)


def rotary_embedding_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q·cos + rotate_half(q)·sin (and the same for k) in float32, rounded once to q's dtype;
    q, k [B, H, S, D], cos, sin [B or 1, S, D] (the heads broadcast)."""
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x1, x2 = x.chunk(2, dim=-1)
        return (x * c + torch.cat((-x2, x1), dim=-1) * s).to(q.dtype)

    return rotate(q), rotate(k)
