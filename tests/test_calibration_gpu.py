"""GPU-only shortcuts of the calibration path give the results of the plain path.

* the greedy rotation loop replayed as a CUDA graph equals the same loop run eagerly;
* the dense Hadamard GEMM used on CUDA for small orders equals the butterfly transform.
Skipped without CUDA (CI is CPU-only).
"""
from __future__ import annotations

import pytest
import torch

from duquant.transforms import hadamard, rotation

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("criterion", ["absmax", "range"])
def test_greedy_rotation_graph_equals_eager(monkeypatch, criterion):
    gen = torch.Generator().manual_seed(0)
    xs = (torch.randn(3, 512, 128, generator=gen, dtype=torch.float64) * torch.rand(3, 1, 128, generator=gen) * 20).cuda()
    run = lambda: rotation.greedy_rotations(xs, 64, [torch.Generator().manual_seed(s) for s in range(3)],  # noqa: E731
                                            "column", criterion)
    graphed = run()
    monkeypatch.setattr(rotation, "_GRAPH_MIN_STEPS", 10**9)
    eager = run()
    assert torch.equal(graphed, eager)
    assert not torch.equal(graphed[0], torch.eye(128, dtype=torch.float64, device="cuda"))  # it did rotate


@pytest.mark.parametrize("n", [64, 96, 128, 512])
@pytest.mark.parametrize("transpose", [False, True])
def test_dense_hadamard_on_cuda_equals_butterflies(n, transpose):
    x = torch.randn(4, 9, n, dtype=torch.float32)
    expected = hadamard.apply_hadamard(x.double(), transpose=transpose)  # CPU: butterflies, float64
    got = hadamard.apply_hadamard(x.cuda(), transpose=transpose)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    half = hadamard.apply_hadamard(x.cuda().half(), transpose=transpose)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.cpu().double(), expected, rtol=2e-3, atol=2e-3)
