"""CPU semantics of the W4A4 kernel references (duquant.kernels.reference) and the CPU
fallbacks of duquant.kernels.ops."""
from __future__ import annotations

import math

import pytest
import torch

from duquant.kernels import ops
from duquant.kernels import reference as ref
from duquant.kernels.weight import prepare_weight, quantize_weight
from duquant.quant.packing import pack_codes, unpack_codes
from duquant.quant.quantizer import QuantSpec, compute_qparams, dequantize, quantize


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q.to(torch.float32).contiguous()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.mark.parametrize("m,k,n", [(1, 576, 64), (7, 1536, 128), (5, 256, 128)])
def test_transform_quantize_matches_shared_quantizer(m: int, k: int, n: int, gen: torch.Generator) -> None:
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    rot1, rot2 = _orthogonal(n, gen), _orthogonal(n, gen)
    perm = torch.randperm(k, generator=gen)
    smooth = torch.rand(k, generator=gen) + 0.5
    a, s = ref.transform_quantize_ref(x, rot1, perm, rot2, smooth, bits=4, clip=0.9)
    # The transform written out densely in float64, then the shared quantizer in float32.
    eye = torch.eye(k // n, dtype=torch.float64)
    dense = torch.diag(1 / smooth.double()) @ torch.kron(eye, rot1.double())
    dense = dense[:, perm] @ torch.kron(eye, rot2.double())
    h = (x.double() @ dense).float()
    assert torch.allclose(ref.duquant_transform_ref(x, rot1, perm, rot2, smooth), h, atol=1e-5, rtol=1e-5)
    spec = QuantSpec(bits=4, symmetric=False, clip=0.9)
    h = ref.duquant_transform_ref(x, rot1, perm, rot2, smooth)
    scale, zero = compute_qparams(h, spec)
    q = quantize(h, scale, zero, spec)
    assert a.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (m,)
    assert torch.equal(a.to(torch.float32), q.to(torch.float32) - zero)
    assert torch.equal(s, scale.squeeze(-1))
    assert torch.equal(a.to(torch.float32) * s[:, None], dequantize(q, scale, zero))
    assert int(a.abs().max()) <= 15


def test_transform_stages_optional(gen: torch.Generator) -> None:
    x = torch.randn(3, 4, 128, generator=gen)
    a, s = ref.transform_quantize_ref(x, None, None, None, None)
    spec = QuantSpec(bits=4, symmetric=False, clip=0.9)
    scale, zero = compute_qparams(x.reshape(-1, 128), spec)
    assert torch.equal(s, scale.squeeze(-1)) and a.shape == (12, 128)


def test_block_rotate_is_block_diagonal_matmul(gen: torch.Generator) -> None:
    h = torch.randn(4, 256, generator=gen)
    rot = _orthogonal(64, gen)
    dense = torch.kron(torch.eye(4), rot)
    assert torch.allclose(ref.block_rotate(h, rot), h @ dense, atol=1e-5)


@pytest.mark.parametrize("k,m", [(64, 1), (192, 12), (80, 20)])
def test_hadamard_ref_is_dense_kronecker(k: int, m: int, gen: torch.Generator) -> None:
    had_m = None if m == 1 else (torch.randint(0, 2, (m, m), generator=gen) * 2 - 1).float()
    x = torch.randn(3, k, generator=gen)
    dense = ref.sylvester(k // m) if had_m is None else torch.kron(had_m, ref.sylvester(k // m))
    expect = x.double() @ dense.double() / math.sqrt(k)
    assert torch.allclose(ref.hadamard_transform_ref(x, had_m).double(), expect, atol=1e-4)


def test_hadamard_ref_is_orthonormal(gen: torch.Generator) -> None:
    had_2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # a genuine Hadamard factor: H is orthonormal
    x = torch.randn(5, 256, generator=gen)
    y = ref.hadamard_transform_ref(x, had_2)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    a, s = ref.hadamard_quantize_ref(x, had_2)
    assert a.shape == (5, 256) and s.shape == (5,)


def test_pack_unpack_and_packed_weight(gen: torch.Generator) -> None:
    codes = torch.randint(0, 16, (12, 64), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    assert packed.shape == (12, 32) and torch.equal(unpack_codes(packed, 4), codes)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0]) and torch.equal(packed[:, 0] >> 4, codes[:, 1])
    zero = torch.randint(3, 12, (12,), generator=gen).float()
    pw = prepare_weight(codes, torch.rand(12, generator=gen), zero, prefill="int8")
    assert torch.equal(pw.codes(), codes)
    assert torch.equal(pw.w8.to(torch.int16), codes.to(torch.int16) - zero.to(torch.int16)[:, None])
    assert pw.nbytes()["packed"] == 12 * 32 and pw.nbytes()["w8"] == 12 * 64
    fp8 = prepare_weight(codes, torch.rand(12, generator=gen), zero, prefill="fp8")
    assert torch.equal(fp8.w8.to(torch.float32), pw.w8.to(torch.float32))  # |q − z| ≤ 15: exact in e4m3
    with pytest.raises(ValueError):
        prepare_weight(codes, torch.rand(12), torch.full((12,), -40.0), prefill="fp8")


@pytest.mark.parametrize("group_size", [0, 32])
def test_gemm_ref_matches_float64_dequantized_matmul(group_size: int, gen: torch.Generator) -> None:
    m, n, k = 9, 24, 128
    w = torch.randn(n, k, generator=gen)
    pw = quantize_weight(w, group_size=group_size)
    a = torch.randint(-15, 16, (m, k), generator=gen, dtype=torch.int8)
    s_x = torch.rand(m, generator=gen) + 0.1
    bias = torch.randn(n, generator=gen)
    w_hat = dequantize(pw.codes(), pw.scale.reshape(n, -1).double(), pw.zero.reshape(n, -1).double(), group_size)
    expect = (a.double() * s_x.double()[:, None]) @ w_hat.T + bias.double()
    y = ref.w4a8_gemm_ref(a, s_x, pw.packed, pw.scale, pw.zero, bias, torch.float32, group_size=group_size)
    assert torch.allclose(y.double(), expect, rtol=1e-5, atol=1e-4)
    y16 = ref.w4a4_linear_ref(a, s_x, pw, bias)
    assert y16.dtype == torch.bfloat16 and torch.allclose(y16.double(), expect, rtol=1e-2, atol=1e-2)


def test_ops_fall_back_to_references_on_cpu(gen: torch.Generator) -> None:
    x = torch.randn(2, 3, 128, generator=gen).to(torch.bfloat16)
    rot = _orthogonal(64, gen)
    perm = torch.randperm(128, generator=gen)
    a, s = ops.transform_quantize(x, rot, perm, rot, None)
    ar, sr = ref.transform_quantize_ref(x, rot, perm, rot, None)
    assert a.shape == (2, 3, 128) and s.shape == (2, 3)
    assert torch.equal(a.reshape(-1, 128), ar) and torch.equal(s.reshape(-1), sr)
    a8, _ = ops.transform_quantize(x, rot, perm, rot, None, out_dtype=torch.float8_e4m3fn)
    assert torch.equal(a8.to(torch.float32), a.to(torch.float32))
    ah, sh = ops.hadamard_quantize(x, None)
    assert torch.equal(ah.reshape(-1, 128), ref.hadamard_quantize_ref(x, None)[0])
    pw = quantize_weight(torch.randn(40, 128, generator=gen))
    y = ops.w4a4_linear(a, s, pw)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert torch.equal(y.reshape(-1, 40), ref.w4a4_linear_ref(ar, sr, pw))
    assert torch.equal(ops.duquant_linear(x, pw, rot, perm, rot), y)


def test_release_scratch_empties_the_kernel_caches():
    """Benchmarks drop one variant's kernel scratch before building the next."""
    import sys

    from duquant.kernels import ops

    ops.release_scratch()  # fine when no kernel module was ever imported
    triton_transform = sys.modules.get("duquant.kernels.triton_transform")
    if triton_transform is None:
        pytest.importorskip("triton")
        from duquant.kernels import triton_transform
    triton_transform._BUF[("probe", torch.float32, torch.device("cpu"))] = torch.zeros(4)
    ops.release_scratch()
    assert not triton_transform._BUF


def test_transform_kernel_choice(monkeypatch: pytest.MonkeyPatch):
    from duquant.kernels import ops

    assert ops.TRANSFORM_KERNEL == "auto"
    # K ≤ 4096: rows wherever the blocks need no padding (32 of 128, 8 of 64), at every M
    assert [ops.transform_kernel(m, 4096) for m in (1, 2, 16, 64, 2048)] == ["rows"] * 5
    assert ops.transform_kernel(17, 512, 64) == "rows"
    # padded blocks (SmolLM2's 9 of 64): rows for one token only
    assert [ops.transform_kernel(m, 576, 64) for m in (1, 2, 2048)] == ["rows", "tiles", "tiles"]
    # K = 11008 (86 blocks padded to 128): rows from 17 to 256 tokens; never past a 16384-element tile
    assert [ops.transform_kernel(m, 11008) for m in (1, 16, 17, 256, 257, 2048)] == [
        "tiles", "tiles", "rows", "rows", "tiles", "tiles"]
    assert ops.transform_kernel(64, 28672) == "tiles"  # 224 blocks: a 256 × 128 tile
    monkeypatch.setattr(ops, "ROWS_MAX_M", 16)
    for mode, small, large in (("tiles", "tiles", "tiles"), ("rows", "rows", "rows"), ("auto", "rows", "tiles")):
        monkeypatch.setattr(ops, "TRANSFORM_KERNEL", mode)
        assert (ops.transform_kernel(16, 576, 64), ops.transform_kernel(17, 576, 64)) == (small, large)
        assert ops.transform_kernel(16, 11008) == ("rows" if mode == "rows" else "tiles")


def test_row_tile():
    """One token per program up to 64 tokens (4 warps at K = 4096, 8 for K = 11008's 128 × 128
    tile), 64-row tiles above."""
    pytest.importorskip("triton")
    from duquant.kernels.triton_row_transform import row_tile
    assert [row_tile(4096, 128, m) for m in (1, 64, 65, 2048)] == [(32, 1, 4), (32, 1, 4), (32, 2, 4), (32, 2, 4)]
    assert [row_tile(11008, 128, m) for m in (1, 256)] == [(128, 1, 8), (128, 1, 8)]
    assert row_tile(576, 64, 2048) == (16, 4, 4)


@pytest.mark.parametrize("capturing, m, forced, expected", [
    (False, 1, None, True), (False, 8192, None, True), (False, 8193, None, False),  # eager: one launch to 8192
    (True, 1, None, False), (True, 2048, None, False),  # graph capture: three launches (less GPU time)
    (True, 1, "1", True), (False, 1, "0", False),  # DUQUANT_FUSED_TRANSFORM forces either
])
def test_transform_launch_form(monkeypatch, capturing, m, forced, expected):
    """The tiles transform runs as one launch in eager mode (less host time) and as three
    inside a CUDA-graph capture (less GPU time at replay)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from duquant.kernels import triton_transform as tt

    monkeypatch.setattr(tt, "_INTERPRET", SimpleNamespace(value=False))
    monkeypatch.setattr(tt, "_sm_count", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    if forced is None:
        monkeypatch.delenv("DUQUANT_FUSED_TRANSFORM", raising=False)
    else:
        monkeypatch.setenv("DUQUANT_FUSED_TRANSFORM", forced)
    assert tt.fused_default(SimpleNamespace(is_cuda=True, device="cuda"), m, programs=32) is expected
    assert tt.fused_default(SimpleNamespace(is_cuda=True, device="cuda"), m, programs=200) is False  # > SMs


def test_tensor_keyed_cache_needs_the_very_same_tensor():
    """Prepared transform factors are cached per tensor. A different tensor at the same address
    (here a view; in the GPU tests, a fresh rotation where a freed one lived) must not get the
    old entry, nor a tensor changed in place since."""
    from duquant.kernels.tensor_cache import TensorKeyedCache

    cache, made = TensorKeyedCache(), []
    t = torch.randn(4, 4)

    def value(tag):
        return lambda: made.append(tag) or tag

    assert cache.get((t, None), "x", value(1)) == 1
    assert cache.get((t, None), "x", value(2)) == 1  # the same tensor: a hit
    alias = t.view(4, 4)  # same data_ptr, version, shape and dtype; another tensor
    assert alias.data_ptr() == t.data_ptr() and alias is not t
    assert cache.get((alias, None), "x", value(3)) == 3
    t.add_(1)  # in place: a new version
    assert cache.get((t, None), "x", value(4)) == 4
    assert cache.get((t, None), "y", value(5)) == 5  # another `extra`
    assert made == [1, 3, 4, 5]


def test_tensor_keyed_cache_forgets_dead_entries_before_live_ones():
    """A full cache first drops the entries of freed tensors (an earlier model's factors); the
    live entries stay hits. Only a cache full of live entries starts over."""
    from duquant.kernels.tensor_cache import TensorKeyedCache

    cache = TensorKeyedCache(max_entries=3)
    live = [torch.randn(2), torch.randn(2)]
    for i, t in enumerate(live):
        cache.get((t,), None, lambda i=i: i)
    dead = torch.randn(2)
    cache.get((dead,), None, lambda: "dead")
    del dead
    new = torch.ones(1)
    cache.get((new,), None, lambda: "new")  # full: the dead entry goes, the live ones stay
    assert [cache.get((t,), None, lambda: "remade") for t in live] == [0, 1]
    keep = torch.zeros(3)
    cache.get((keep,), None, lambda: "fourth")  # full of live entries now: cleared
    assert cache.get((live[0],), None, lambda: "remade") == "remade"


def test_dependent_launch_switch_and_support():
    """PDL is off by default, `decode_pdl` switches it for a block and restores it (also on
    error), and it is never offered off a GPU."""
    from duquant.kernels import dependent_launch as dl

    assert not dl.pdl_supported(torch.device("cpu"))
    before = dl.DECODE_PDL
    with dl.decode_pdl(not before):
        assert dl.DECODE_PDL is (not before)
    assert dl.DECODE_PDL is before
    with pytest.raises(RuntimeError), dl.decode_pdl(not before):
        raise RuntimeError
    assert dl.DECODE_PDL is before


def test_decode_attention_kernel_choice():
    """The group kernel (a KV head's query heads as the MMA rows) serves grouped-query models in
    16-bit dtypes; MHA and float32 queries (whose group kernel spills on sm_90) get one program
    per query head."""
    from duquant.kernels.triton_decode_attention import group_kernel_applies
    assert group_kernel_applies(torch.bfloat16, 32, 8) and group_kernel_applies(torch.float16, 9, 3)
    assert not group_kernel_applies(torch.bfloat16, 32, 32)
    assert not group_kernel_applies(torch.float32, 32, 8)
