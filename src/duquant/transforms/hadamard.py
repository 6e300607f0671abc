"""Hadamard matrices of order n = m·2^k and the fast transform x ↦ x·H_n/√n.

Conventions the rest of the package relies on:

* `hadamard_matrix(n) = kron(H_m, S_{2^k})`: the small "base" matrix H_m is the OUTER
  Kronecker factor and the Sylvester matrix S_{2^k} (S[a, b] = (−1)^popcount(a & b),
  symmetric) the inner one. Index i of H_n is (i // 2^k, i % 2^k).
* m is the smallest base order that divides n with n/m a power of two (m = 1 for powers
  of two). Doubling is never stored in H_m: it is part of the Sylvester factor.
* `apply_hadamard(x)` returns `x @ H_n/√n` (a ROW vector times the matrix). H_m is not
  symmetric for every m (Paley I and Williamson bases are not), so the inverse is
  `apply_hadamard(y, transpose=True) = y @ H_nᵀ/√n`.

Base orders are built, never stored as matrices: Paley I (q + 1 for a prime power
q ≡ 3 mod 4), Paley II (2(q + 1) for q ≡ 1 mod 4) and Williamson's array over four
symmetric circulant sequences read from `hadamard_data/williamson_<t>.txt` (order 4t),
for the orders where neither Paley construction applies (92, 116, 156, 172).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

_DATA_DIR = Path(__file__).with_name("hadamard_data")


# ----------------------------------------------------------------------------- finite fields


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime; None if q is not a prime power."""
    if q < 2:
        return None
    # the smallest factor is prime
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _poly_rem(a: list[int], b: list[int], p: int) -> list[int]:
    """Remainder of a by the monic b over GF(p); coefficients from low to high degree."""
    a = list(a)
    while len(a) >= len(b):
        c, shift = a[-1], len(a) - len(b)
        for i, bi in enumerate(b):
            a[shift + i] = (a[shift + i] - c * bi) % p
        a.pop()
    return a


def _irreducible(p: int, e: int) -> list[int]:
    """Some monic irreducible polynomial of degree e over GF(p), by trial division."""
    for low in itertools.product(range(p), repeat=e):
        f = [*low, 1]
        if low[0] == 0:
            continue
        divisors = (
            [*g, 1] for d in range(1, e // 2 + 1) for g in itertools.product(range(p), repeat=d)
        )
        if all(any(_poly_rem(f, g, p)) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = χ(a − b) over GF(q), χ the quadratic character (χ(0) = 0).

    Element i of GF(p^e) is the polynomial whose coefficients are the base-p digits of i,
    so for prime q the matrix is circulant.
    """
    p, e = _prime_power(q)  # type: ignore[misc]
    digits = (torch.arange(q)[:, None] // p ** torch.arange(e)) % p  # [q, e]
    # Square every element as a polynomial, then reduce modulo an irreducible f.
    sq = torch.zeros(q, 2 * e - 1, dtype=torch.long)
    for i in range(e):
        for j in range(e):
            sq[:, i + j] += digits[:, i] * digits[:, j]
    f = torch.tensor(_irreducible(p, e)[:-1]) if e > 1 else torch.zeros(0, dtype=torch.long)
    for d in range(2 * e - 2, e - 1, -1):  # x^d = −x^(d−e)·(f_0 + … + f_{e−1} x^(e−1))
        sq[:, d - e : d] -= sq[:, d : d + 1] * f
    sq = sq[:, :e] % p
    is_square = torch.zeros(q, dtype=torch.bool)
    is_square[(sq * p ** torch.arange(e)).sum(1)] = True
    chi = torch.where(is_square, 1, -1)
    chi[0] = 0
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # digit-wise subtraction
    return chi[(diff * p ** torch.arange(e)).sum(-1)].to(torch.float64)


# ----------------------------------------------------------------------------- base orders


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1, q ≡ 3 mod 4: H = I + S with S = [[0, 1ᵀ], [−1, Q]] skew (S·Sᵀ = qI)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1), q ≡ 1 mod 4, from the symmetric conference matrix C = [[0, 1ᵀ], [1, Q]]:
    H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    on = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    off = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, on) + torch.kron(torch.eye(q + 1, dtype=torch.float64), off)


@lru_cache(maxsize=None)
def _williamson_lengths() -> tuple[int, ...]:
    return tuple(sorted(int(p.stem.split("_")[1]) for p in _DATA_DIR.glob("williamson_*.txt")))


def _circulant(first_row: torch.Tensor) -> torch.Tensor:
    t = first_row.numel()
    idx = (torch.arange(t)[None, :] - torch.arange(t)[:, None]) % t
    return first_row[idx]


def _williamson(t: int) -> torch.Tensor:
    """Order 4t from symmetric circulant A, B, C, D with A² + B² + C² + D² = 4t·I, placed in
    Williamson's array (the rows of quaternion multiplication), orthogonal because the
    four matrices commute."""
    lines = [ln.strip() for ln in (_DATA_DIR / f"williamson_{t}.txt").read_text().splitlines()]
    rows = [ln for ln in lines if ln and not ln.startswith("#")]
    a, b, c, d = (
        _circulant(torch.tensor([1.0 if ch == "+" else -1.0 for ch in r], dtype=torch.float64)) for r in rows
    )
    return torch.cat(
        [
            torch.cat([a, b, c, d], 1),
            torch.cat([-b, a, -d, c], 1),
            torch.cat([-c, d, a, -b], 1),
            torch.cat([-d, -c, b, a], 1),
        ],
        0,
    )


def _base_builder(m: int) -> Callable[[], torch.Tensor] | None:
    """The construction that yields order m directly (without doubling), or None."""
    if m == 1:
        return lambda: torch.ones(1, 1, dtype=torch.float64)
    if m % 4:
        return None
    pe = _prime_power(m - 1)
    if pe and (m - 1) % 4 == 3:
        return lambda: _paley1(m - 1)
    pe = _prime_power(m // 2 - 1)
    if pe and (m // 2 - 1) % 4 == 1:
        return lambda: _paley2(m // 2 - 1)
    if m // 4 in _williamson_lengths():
        return lambda: _williamson(m // 4)
    return None


def supported_base_orders(limit: int = 200) -> list[int]:
    """Base orders m ≤ limit that `hadamard_matrix` uses: n is supported iff n = m·2^k.

    Orders that are a smaller base order times a power of two (24 = 12·2, 32, …) are
    left out: they are never chosen, the doubling goes to the Sylvester factor.
    """
    return [m for m in range(1, limit + 1) if _decompose_or_none(m) == (m, 0)]


def _decompose_or_none(n: int) -> tuple[int, int] | None:
    """n = m·2^k with the smallest buildable base order m, None if there is none."""
    k = (n & -n).bit_length() - 1
    odd = n >> k
    if odd == 1:
        return 1, k
    for j in range(2, k + 1):  # a Hadamard order > 2 is a multiple of 4
        if _base_builder(odd << j) is not None:
            return odd << j, k - j
    return None


def _decompose(n: int) -> tuple[int, int]:
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    found = _decompose_or_none(n)
    if found is not None:
        return found
    raise ValueError(
        f"no Hadamard matrix of order {n} is available: n must be m·2^k with m one of "
        f"{supported_base_orders()} (or a larger Paley order: q + 1 for a prime power q ≡ 3 mod 4, "
        f"2(q + 1) for q ≡ 1 mod 4; Williamson data for 4t, t in {list(_williamson_lengths())})"
    )


@lru_cache(maxsize=None)
def _base_matrix(m: int) -> torch.Tensor:
    h = _base_builder(m)()  # type: ignore[misc]
    if not torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)):
        raise AssertionError(f"internal error: base Hadamard matrix of order {m} is not orthogonal")
    return h


@lru_cache(maxsize=64)
def _base_on(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The base matrix where the activations live, copied once (not on every forward)."""
    return _base_matrix(m).to(device=device, dtype=dtype)


def _sylvester(k: int, dtype: torch.dtype) -> torch.Tensor:
    """S[a, b] = (−1)^popcount(a & b): the k-fold Kronecker power of [[1, 1], [1, −1]]."""
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=dtype)
    s = torch.ones(1, 1, dtype=dtype)
    for _ in range(k):
        s = torch.kron(h2, s)
    return s


# ----------------------------------------------------------------------------- public API


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix of order n (H·Hᵀ = n·I), = kron(H_m, S_{2^k}).

    Any dtype that holds ±1 works (int8 keeps large orders small in memory).
    """
    m, k = _decompose(n)
    return torch.kron(_base_matrix(m).to(dtype), _sylvester(k, dtype))


def normalized_hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthogonal H_n/√n (a fresh tensor each call, safe to modify)."""
    return (hadamard_matrix(n, torch.float64) / math.sqrt(n)).to(dtype)


def random_signs(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n independent ±1 drawn from `generator` (on the generator's device)."""
    bits = torch.randint(0, 2, (n,), generator=generator, device=generator.device)
    return (1 - 2 * bits).to(dtype)


def random_hadamard(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomised Hadamard Q = diag(s)·H_n/√n, s = random_signs(n, generator).

    Row i is scaled by s_i, so x @ Q == apply_hadamard(x * s). Returned on the CPU.
    """
    s = random_signs(n, generator, torch.float64).cpu()
    return (s[:, None] * normalized_hadamard(n, torch.float64)).to(dtype)


def random_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a Gaussian, columns signed so diag(R) > 0
    (without the sign fix the distribution is not uniform). Returned on the CPU."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    q, r = torch.linalg.qr(g)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * sign).to(dtype)


# Up to this order a GPU applies the whole matrix faster than the butterflies: one GEMM pass
# over the activation (n multiply-adds per element) against log2(n) passes that each read
# and write it (Q and K of every layer, head_dim 64 or 128, in calibration).
_DENSE_MAX_ORDER = 512


@lru_cache(maxsize=16)
def _dense_on(n: int, transpose: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    h = normalized_hadamard(n)
    return (h.T if transpose else h).contiguous().to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def hadamard_on(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ±1 matrix H_n on `device` in `dtype` (exact in every dtype), built once per (n, device,
    dtype): a kernel multiplies by it and scales by 1/√n afterwards."""
    return hadamard_matrix(n, torch.float64).to(device=device, dtype=dtype)


def _fwht(y: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform of the last dim (a power of two): y @ S."""
    *lead, p = y.shape
    h = 1
    while h < p:  # one butterfly per bit: pairs (i, i + h) → (a + b, a − b)
        y = y.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, p)


def apply_hadamard(x: torch.Tensor, n: int | None = None, transpose: bool = False) -> torch.Tensor:
    """x @ H_n/√n over the last dimension (x @ H_nᵀ/√n with `transpose`), in O(n·(log n + m)).

    Equals `x @ normalized_hadamard(n).to(x)` up to rounding. 16-bit inputs are computed in
    float32 and cast back; float64 stays float64.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"last dimension {x.shape[-1]} does not match Hadamard size {n}")
    m, k = _decompose(n)
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.is_cuda and n <= _DENSE_MAX_ORDER:
        return (x.to(cdtype) @ _dense_on(n, transpose, x.device, cdtype)).to(x.dtype)
    # x[(i, a)] with i over the H_m factor and a over the Sylvester factor (kron order).
    y = _fwht(x.to(cdtype).reshape(x.numel() // n, m, 1 << k))
    if m > 1:
        hm = _base_on(m, x.device, cdtype)
        # (x @ (H_m ⊗ S))[(j, b)] = Σ_i H_m[i, j]·(x S)[(i, b)], i.e. H_mᵀ on the left.
        y = torch.matmul(hm if transpose else hm.T, y)
    return (y * (1.0 / math.sqrt(n))).reshape(x.shape).to(x.dtype)
