"""Hadamard matrices: exact orthogonality, ±1 entries, the Kronecker convention and the
fast transform against the dense product."""
from __future__ import annotations

import math

import pytest
import torch

from duquant.transforms.hadamard import (
    _paley1,
    _paley2,
    apply_hadamard,
    hadamard_matrix,
    normalized_hadamard,
    random_hadamard,
    random_orthogonal,
    random_signs,
    supported_base_orders,
)

SMALL_ORDERS = [1, 2, 4, 8, 12, 20, 28, 36, 40, 52, 60, 92, 108, 116, 140, 156, 172]
MEDIUM_ORDERS = [64, 576, 1536, 4096]
LARGE_ORDERS = [11008, 14336]  # too big for a full H·Hᵀ: sampled rows + Kronecker structure


def _assert_hadamard(h: torch.Tensor) -> None:
    n = h.shape[0]
    assert h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    # float32 is exact here: every entry of H·Hᵀ is an integer of magnitude ≤ n < 2^24
    hf = h.to(torch.float32)
    assert torch.equal(hf @ hf.T, n * torch.eye(n))


@pytest.mark.parametrize("n", sorted(set(SMALL_ORDERS + supported_base_orders())))
def test_small_orders_are_hadamard(n: int) -> None:
    _assert_hadamard(hadamard_matrix(n))


@pytest.mark.parametrize("n", MEDIUM_ORDERS)
def test_medium_orders_are_hadamard(n: int) -> None:
    _assert_hadamard(hadamard_matrix(n, torch.float32))


@pytest.mark.parametrize("q", [9, 25, 27, 49, 343])
def test_paley_over_prime_power_fields(q: int) -> None:
    """GF(p^e) arithmetic: Paley I for q ≡ 3 mod 4, Paley II for q ≡ 1 mod 4."""
    _assert_hadamard(_paley1(q) if q % 4 == 3 else _paley2(q))


@pytest.mark.parametrize("n", LARGE_ORDERS)
def test_large_orders(n: int) -> None:
    h = hadamard_matrix(n, torch.int8)
    assert bool(((h == 1) | (h == -1)).all())
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:24]
    gram = h[rows].to(torch.float32) @ h.to(torch.float32).T  # exact integers
    expected = torch.zeros(len(rows), n)
    expected[torch.arange(len(rows)), rows] = n
    assert torch.equal(gram, expected)


@pytest.mark.parametrize("n, m", [(576, 36), (1536, 12), (11008, 172), (14336, 28), (40, 20), (4096, 1)])
def test_kronecker_convention(n: int, m: int) -> None:
    """H_n = kron(H_m, S_{n/m}): the base order is the outer factor."""
    expected = torch.kron(hadamard_matrix(m, torch.int8), hadamard_matrix(n // m, torch.int8))
    assert torch.equal(hadamard_matrix(n, torch.int8), expected)


def _dense_product(x: torch.Tensor, n: int) -> torch.Tensor:
    """x @ H_n/√n in float64, column block by column block to bound memory."""
    h = hadamard_matrix(n, torch.int8)
    cols = [x @ h[:, c : c + 2048].to(torch.float64) for c in range(0, n, 2048)]
    return torch.cat(cols, -1) / math.sqrt(n)


@pytest.mark.parametrize("n", SMALL_ORDERS + MEDIUM_ORDERS + LARGE_ORDERS)
def test_apply_hadamard_matches_dense(n: int) -> None:
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = _dense_product(x, n)
    assert (apply_hadamard(x) - dense).abs().max().item() < 1e-10
    if n <= 4096:
        assert (dense - x @ normalized_hadamard(n)).abs().max().item() < 1e-10
        y = x @ normalized_hadamard(n).T
        assert (apply_hadamard(x, transpose=True) - y).abs().max().item() < 1e-10


@pytest.mark.parametrize("n", [172, 1536])
def test_transpose_inverts(n: int) -> None:
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(apply_hadamard(x), transpose=True), x, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_dtypes_and_leading_shapes(dtype: torch.dtype, tol: float) -> None:
    x = torch.randn(2, 3, 5, 1536)
    out = apply_hadamard(x.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    ref = x.double() @ normalized_hadamard(1536)
    assert (out.double() - ref).abs().max().item() < tol * ref.abs().max().item()


def test_size_mismatch_and_unsupported_raise() -> None:
    with pytest.raises(ValueError, match="does not match"):
        apply_hadamard(torch.randn(2, 64), n=128)
    for n in (0, 3, 6, 18, 188):  # 188 = 4·47: neither Paley nor Williamson
        with pytest.raises(ValueError):
            hadamard_matrix(n)
    with pytest.raises(ValueError, match="12, 20"):
        apply_hadamard(torch.randn(1, 6))


def _orthogonal(q: torch.Tensor) -> bool:
    return torch.allclose(q @ q.T, torch.eye(q.shape[0], dtype=q.dtype), atol=1e-12)


@pytest.mark.parametrize("make", [random_hadamard, random_orthogonal])
def test_random_rotations(make) -> None:
    n = 172
    q1 = make(n, torch.Generator().manual_seed(1))
    q2 = make(n, torch.Generator().manual_seed(1))
    q3 = make(n, torch.Generator().manual_seed(2))
    assert q1.dtype == torch.float64 and _orthogonal(q1) and _orthogonal(q3)
    assert torch.equal(q1, q2)
    assert not torch.equal(q1, q3)
    assert make(n, torch.Generator().manual_seed(1), torch.float32).dtype == torch.float32


def test_random_hadamard_sign_convention() -> None:
    """Q = diag(s)·H/√n with s = random_signs drawn first from the same generator."""
    n = 576
    q = random_hadamard(n, torch.Generator().manual_seed(3))
    s = random_signs(n, torch.Generator().manual_seed(3))
    assert torch.equal(q, s[:, None] * normalized_hadamard(n))
    x = torch.randn(2, n, dtype=torch.float64)
    assert torch.allclose(x @ q, apply_hadamard(x * s), atol=1e-12)
