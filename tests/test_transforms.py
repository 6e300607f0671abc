"""The invariants every transform must keep, in float64 at real layer sizes."""
import pytest
import torch

from duquant.methods.plan import GroupTransform  # noqa: F401  (import check)
from duquant.transforms.online import OnlineTransform
from duquant.transforms.permutation import block_mean_variance, zigzag_permutation
from duquant.transforms.rotation import (
    auto_block_size,
    fit_block_rotation,
    greedy_rotation,
    greedy_rotations,
    rotate_blocks,
    uniform_first_row_basis,
)
from duquant.transforms.smoothing import smoothing_scales, weight_input_absmax

# SmolLM2's hidden (576 = 9·64) and MLP (1536 = 12·128) sizes, and LLaMA-2-7B's hidden size.
REAL_SIZES = [(576, 64), (1536, 128), (4096, 128)]


def activations_with_outliers(tokens: int, channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g, dtype=torch.float64)
    x[:, 5] *= 40.0  # a "normal" outlier channel
    x[0, channels // 3] = 3000.0  # a massive outlier on the first token
    return x


def weight(out: int, channels: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_equivalent(x, w, x_t, w_t):
    ref = x @ w.T
    assert torch.allclose(x_t @ w_t.T, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


@pytest.mark.parametrize("channels,block", REAL_SIZES)
def test_smoothing_equivalence(channels, block):
    x, w = activations_with_outliers(64, channels), weight(32, channels)
    s = smoothing_scales(x.abs().amax(0), weight_input_absmax([w]), alpha=0.6)
    assert_equivalent(x, w, x / s, w * s)


def test_smoothing_closed_form_and_weight_statistic():
    act, w_max = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 16.0])
    s = smoothing_scales(act, w_max, alpha=0.5)
    assert torch.allclose(s, torch.tensor([2.0, 0.25], dtype=torch.float64))
    w1, w2 = torch.tensor([[1.0, -5.0]]), torch.tensor([[-3.0, 2.0]])
    assert weight_input_absmax([w1, w2], "group").tolist() == [3.0, 5.0]
    assert weight_input_absmax([w1, w2], "first").tolist() == [1.0, 5.0]


@pytest.mark.parametrize("channels,block", REAL_SIZES)
def test_block_rotation_equivalence_and_orthogonality(channels, block):
    x, w = activations_with_outliers(256, channels), weight(48, channels)
    rot = fit_block_rotation(x, block, steps=32, generator=torch.Generator().manual_seed(0))
    assert rot.shape == (block, block)
    assert torch.allclose(rot @ rot.T, torch.eye(block, dtype=torch.float64), atol=1e-10)
    assert_equivalent(x, w, rotate_blocks(x, rot), rotate_blocks(w, rot))


@pytest.mark.parametrize("channels,block", REAL_SIZES)
def test_permutation_equivalence(channels, block):
    x, w = activations_with_outliers(64, channels), weight(16, channels)
    perm = zigzag_permutation(x.abs().amax(0), block)
    assert sorted(perm.tolist()) == list(range(channels))
    assert_equivalent(x, w, x[:, perm], w[:, perm])


@pytest.mark.parametrize("channels,block", REAL_SIZES)
def test_composition_equivalence(channels, block):
    """Smoothing → R̂₁ → P → R̂₂, as the model applies it (OnlineTransform, float64 buffers)."""
    x, w = activations_with_outliers(128, channels), weight(24, channels)
    g = torch.Generator().manual_seed(0)
    s = smoothing_scales(x.abs().amax(0), weight_input_absmax([w]), alpha=0.6)
    xs = x / s
    rot1 = fit_block_rotation(xs, block, 16, g)
    perm = zigzag_permutation(rotate_blocks(xs, rot1).abs().amax(0), block)
    rot2 = fit_block_rotation(rotate_blocks(xs, rot1)[:, perm], block, 16, g)
    online = OnlineTransform(channels, rot1, perm, rot2, dtype=torch.float64)
    assert_equivalent(x, w, online(xs), online.fold_into_weight(w * s))


@pytest.mark.parametrize("exchange,criterion", [("column", "absmax"), ("row", "range")])
def test_batched_greedy_rotations_equal_one_at_a_time(exchange, criterion):
    """A layer's groups are fitted in one batched loop (quantize.fit_groups); each block
    must get exactly the rotation it would get alone, from its own generator."""
    xs = torch.stack([activations_with_outliers(96, 64, seed=s) for s in range(3)])
    batched = greedy_rotations(xs, 24, [torch.Generator().manual_seed(s) for s in range(3)], exchange, criterion)
    for s in range(3):
        alone = greedy_rotation(xs[s], 24, torch.Generator().manual_seed(s), exchange, criterion)
        assert torch.equal(batched[s], alone)
    assert not torch.equal(batched[0], batched[1])  # the generators differ, so must the rotations


def test_uniform_first_row_basis_is_orthogonal():
    for n in (2, 64, 128):
        b = uniform_first_row_basis(n)
        assert torch.allclose(b @ b.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(b[0], torch.full((n,), n**-0.5, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("criterion", ["absmax", "range"])
def test_greedy_never_worse_than_identity(seed, criterion):
    """Theorem 1: the kept prefix never raises max|X| (or max − min) above the identity's."""
    g = torch.Generator().manual_seed(seed)
    kinds = [
        torch.randn(128, 64, generator=g, dtype=torch.float64),  # no outlier: rotation may not help
        activations_with_outliers(128, 64, seed),
        torch.rand(128, 64, generator=g, dtype=torch.float64),  # all positive
    ]
    for x in kinds:
        rot = greedy_rotation(x, steps=64, generator=g, criterion=criterion)
        after = x @ rot
        if criterion == "absmax":
            assert after.abs().max() <= x.abs().max() + 1e-9
        else:
            assert after.max() - after.min() <= x.max() - x.min() + 1e-9


def test_greedy_spreads_a_massive_outlier():
    x = activations_with_outliers(256, 128)
    rot = greedy_rotation(x[:, :128], steps=256, generator=torch.Generator().manual_seed(0))
    assert (x[:, :128] @ rot).abs().max() < 0.25 * x[:, :128].abs().max()


def test_exchange_variants_both_work():
    x = activations_with_outliers(64, 64)
    for exchange in ("column", "row"):
        rot = greedy_rotation(x, 32, torch.Generator().manual_seed(0), exchange=exchange)
        assert torch.allclose(rot @ rot.T, torch.eye(64, dtype=torch.float64), atol=1e-10)


def test_zigzag_lowers_block_variance():
    """Eq. 4: zigzag balances the blocks far better than the identity order or a random order."""
    g = torch.Generator().manual_seed(0)
    absmax = torch.rand(1536, generator=g, dtype=torch.float64)
    absmax[:40] += 50 * torch.rand(40, generator=g, dtype=torch.float64)  # large channels crowded in block 0
    perm = zigzag_permutation(absmax, 128)
    identity = block_mean_variance(absmax, 128)
    shuffled = block_mean_variance(absmax, 128, torch.randperm(1536, generator=g))
    zigzag = block_mean_variance(absmax, 128, perm)
    assert zigzag < identity / 100
    assert zigzag < shuffled / 5


def test_zigzag_deal_order():
    absmax = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0])  # already sorted
    # Two blocks: ranks go 0,1,1,0,0,1,1,0 -> block 0 = {9, 6, 5, 2}, block 1 = {8, 7, 4, 3}
    assert zigzag_permutation(absmax, 4).tolist() == [0, 3, 4, 7, 1, 2, 5, 6]


@pytest.mark.parametrize("channels,expected", [(576, 64), (1536, 128), (4096, 128), (11008, 128), (96, 32), (7, 1)])
def test_auto_block_size(channels, expected):
    assert auto_block_size(channels) == expected


def test_greedy_rotation_does_not_depend_on_the_cpu_thread_count():
    """The random step matrices (a LAPACK QR, whose bits depend on the thread count) are built
    on one thread wherever the loop runs, so a rotation is the same on every machine; and the
    loop leaves its float32 input alone (it used to rotate the caller's tensor in place)."""
    from duquant.transforms.rotation import greedy_rotations

    x = torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(0))
    x[0, 3, 5] = 40.0
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            results.append(greedy_rotations(x, 20, [torch.Generator().manual_seed(7)]))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert x[0, 3, 5] == 40.0 and x.dtype == torch.float32
