"""Triton kernels run on CPU by Triton's interpreter, on small odd shapes, against their
references: the dp4a decode GEMV (duquant.kernels.triton_decode.w4a8_gemv) and the
three-launch form of the online transform + quantize (duquant.kernels.triton_transform,
DuQuant and Hadamard) and the whole-row transform kernel (triton_row_transform) and the one-launch RoPE (triton_rope). scripts/test.sh runs this file in a second pytest process.

Opt-in (the interpreter must be on before the kernel module is imported):

    TRITON_INTERPRET=1 python -m pytest tests/test_kernels_interpret.py

(not DUQUANT_TRITON_INTERPRET=1 for the whole session: that would send the CPU-fallback
tests of test_kernels_reference.py to the kernels too; the ops test here sets it itself.)

The interpreter runs the kernel's own index, mask, split-K and epilogue logic (program by
program, so the atomics are trivially ordered) with the inline PTX (dp4a, prmt) replaced by
the same arithmetic on shifts; the PTX itself and the memory ordering are covered by
tests/test_kernels_gpu.py on a GPU. The interpreter rounds float32 -> bf16 by truncation,
so exactness is checked on float32 outputs.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="set TRITON_INTERPRET=1 (Triton's CPU interpreter) to run")
triton = pytest.importorskip("triton")

from duquant.kernels import reference as ref  # noqa: E402
from duquant.kernels.weight import quantize_weight  # noqa: E402


def _case(m: int, n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pw = quantize_weight(torch.randn(n, k, generator=gen))
    a = torch.randint(-15, 16, (m, k), generator=gen, dtype=torch.int8)
    s_x = torch.rand(m, generator=gen) + 0.05
    bias = torch.randn(n, generator=gen).to(torch.bfloat16)
    return pw, a, s_x, bias


def _rel(y: torch.Tensor, yr: torch.Tensor) -> float:
    return float((y.float() - yr.float()).norm() / yr.float().norm())


def _workspace_clean() -> bool:
    from duquant.kernels import triton_decode as dec
    return all(not bool(ws.any()) and not bool(cnt.any()) for ws, cnt in dec._GEMV_WS.values())


# (M, N, K, tune): every token-tile size (BLOCK_M 1..16, padded M), N not a multiple of
# BLOCK_N, K with a masked last tile, K % 32 != 0 (rows not 16-byte aligned: narrow loads),
# several tiles per split, one split (direct store), many splits of one tile.
CASES = [
    (1, 40, 64, dict(block_n=16, block_k=32)),
    (2, 24, 136, dict(block_n=16, block_k=64)),
    (3, 72, 576, dict(block_n=16, block_k=128, waves=8)),
    (4, 33, 96, dict(block_n=32, block_k=32, waves=1)),
    (5, 40, 256, dict(block_n=16, block_k=64, waves=0)),
    (8, 48, 1536, dict(block_n=32, block_k=256, num_warps=8)),
    (16, 17, 200, dict(block_n=16, block_k=64)),
    (7, 64, 576, {}),
]


@pytest.mark.parametrize("m,n,k,tune", CASES)
def test_gemv_matches_reference(m: int, n: int, k: int, tune: dict) -> None:
    from duquant.kernels.triton_decode import gemv_config, w4a8_gemv
    pw, a, s_x, bias = _case(m, n, k)
    cfg = gemv_config(m, n, k, 4, **tune)  # the interpreter "device" has 4 SMs
    assert (cfg["split_k"] - 1) * cfg["tiles_per_split"] < triton.cdiv(k, cfg["BLOCK_K"])  # no empty split
    for b in (None, bias):
        y = w4a8_gemv(a, s_x, pw.packed, pw.scale, pw.zero, b, out_dtype=torch.float32, **tune)
        assert _rel(y, ref.w4a4_linear_ref(a, s_x, pw, b, out_dtype=torch.float32)) < 1e-6
    a_fp8 = a.to(torch.float32).to(torch.float8_e4m3fn)
    y = w4a8_gemv(a_fp8, s_x, pw.packed, pw.scale, pw.zero, bias, out_dtype=torch.float32, **tune)
    assert _rel(y, ref.w4a4_linear_ref(a, s_x, pw, bias, out_dtype=torch.float32)) < 1e-6
    y = w4a8_gemv(a, s_x, pw.packed, pw.scale, pw.zero, bias, **tune)  # bf16 (truncated by the interpreter)
    assert y.dtype == torch.bfloat16 and _rel(y, ref.w4a4_linear_ref(a, s_x, pw, bias)) < 1e-2
    assert _workspace_clean()


def test_gemv_strided_activations() -> None:
    """Activation rows inside a bigger buffer: 4-byte aligned (used in place, narrow loads)
    and unaligned (copied first)."""
    from duquant.kernels.triton_decode import w4a8_gemv
    m, n, k = 3, 24, 128
    pw, a, s_x, bias = _case(m, n, k, seed=1)
    yr = ref.w4a4_linear_ref(a, s_x, pw, bias, out_dtype=torch.float32)
    for pad in (4, 3):
        big = torch.zeros(m + 1, k + pad, dtype=torch.int8)
        big[1:, pad:] = a
        y = w4a8_gemv(big[1:, pad:], s_x, pw.packed, pw.scale, pw.zero, bias, out_dtype=torch.float32,
                      block_n=16, block_k=32)
        assert _rel(y, yr) < 1e-6


@pytest.mark.parametrize("waves", [0, 8])  # one split (direct store), several splits
def test_gemv_workspace_pointers_have_their_own_dtypes(monkeypatch: pytest.MonkeyPatch, waves: int) -> None:
    """The GEMV is compiled for the pointer types it is given, whatever split_k is at run
    time: the arrival counters must be int32 and the sums float32 even with one split (a bf16
    dummy there failed to compile on the H100: no bf16 atomic_xchg; the interpreter accepts it)."""
    from duquant.kernels import triton_decode as dec
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen["split_k"], seen["ws"], seen["cnt"] = grid[1], args[9].dtype, args[10].dtype
            return launch

    monkeypatch.setattr(dec, "w4a8_gemv_kernel", Recorder())
    pw, a, s_x, bias = _case(1, 40, 64)
    dec.w4a8_gemv(a, s_x, pw.packed, pw.scale, pw.zero, bias, block_n=16, block_k=32, waves=waves)
    assert (seen["split_k"] == 1) == (waves == 0)
    assert (seen["ws"], seen["cnt"]) == (torch.float32, torch.int32)


# (M, row counts of the joined weights, K, tune): row counts that end inside a row block
# (the next weight starts a fresh block), split-K and one split, two and three weights.
JOINED = [
    (1, [40, 24, 24], 64, dict(block_n=16, block_k=32)),
    (3, [33, 17], 192, dict(block_n=16, block_k=64, waves=8)),
    (5, [16, 48, 8], 256, dict(block_n=16, block_k=64, waves=0)),
    (16, [64, 40, 24], 136, dict(block_n=32, block_k=64)),
]


def _joined_case(m: int, rows: list[int], k: int, seed: int):
    """Weights of `rows` rows that read one activation: a, s_x, the weights, and their scales, zero
    points and biases stacked along N."""
    cases = [_case(m, n, k, seed=seed + i) for i, n in enumerate(rows)]
    weights = [c[0] for c in cases]
    return (cases[0][1], cases[0][2], weights, torch.cat([w.scale for w in weights]),
            torch.cat([w.zero for w in weights]), torch.cat([c[3] for c in cases]))


def _assert_stacked(y: torch.Tensor, a: torch.Tensor, s_x: torch.Tensor, weights: list, bias: torch.Tensor | None):
    """Column block i of y [M, ΣN_i] is weight i's reference (with its part of the stacked bias)."""
    start = 0
    for i, w in enumerate(weights):
        stop = start + w.out_features
        yr = ref.w4a4_linear_ref(a, s_x, w, None if bias is None else bias[start:stop], out_dtype=torch.float32)
        assert _rel(y[:, start:stop], yr) < 1e-6, f"weight {i}"
        start = stop


@pytest.mark.parametrize("m,rows,k,tune", JOINED)
def test_joined_gemv_is_the_stacked_gemvs(m: int, rows: list[int], k: int, tune: dict) -> None:
    """One launch over 2–3 separate weights = each weight's reference, side by side."""
    from duquant.kernels.triton_decode import w4a8_gemv_joined
    a, s_x, weights, scale, zero, bias = _joined_case(m, rows, k, seed=10)
    for b in (None, bias):
        y = w4a8_gemv_joined(a, s_x, [w.packed for w in weights], scale, zero, b, out_dtype=torch.float32, **tune)
        _assert_stacked(y, a, s_x, weights, b)
    assert _workspace_clean()


def test_ops_joined_linear_uses_one_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.w4a4_linear_joined: one GEMV launch at decode sizes, the same numbers as the
    separate (reference) linears; above the GEMV's M it falls back to one linear per weight."""
    from duquant.kernels import ops
    from duquant.kernels import triton_decode as dec
    monkeypatch.setenv("DUQUANT_TRITON_INTERPRET", "1")
    calls = []
    real = dec.w4a8_gemv_joined
    monkeypatch.setattr(dec, "w4a8_gemv_joined", lambda *args, **kw: calls.append(len(args[2])) or real(*args, **kw))
    a, s_x, weights, scale, zero, _ = _joined_case(2, [40, 24, 24], 128, seed=20)
    y = ops.w4a4_linear_joined(a.reshape(1, 2, 128), s_x.reshape(1, 2), weights, scale, zero, out_dtype=torch.float32)
    assert calls == [3] and y.shape == (1, 2, 88)
    yr = torch.cat([ref.w4a4_linear_ref(a, s_x, w, None, out_dtype=torch.float32) for w in weights], dim=-1)
    assert _rel(y.reshape(2, 88), yr) < 1e-6


def test_ops_dispatches_small_m_to_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    from duquant.kernels import ops
    from duquant.kernels import triton_decode as dec
    monkeypatch.setenv("DUQUANT_TRITON_INTERPRET", "1")
    calls = []
    real = dec.w4a8_gemv
    monkeypatch.setattr(dec, "w4a8_gemv", lambda *args, **kw: calls.append(args[0].shape) or real(*args, **kw))
    pw, a, s_x, bias = _case(3, 40, 192, seed=2)
    y = ops.w4a4_linear(a.reshape(1, 3, 192), s_x.reshape(1, 3), pw, bias, out_dtype=torch.float32)
    assert calls == [(3, 192)] and y.shape == (1, 3, 40)
    assert _rel(y.reshape(3, 40), ref.w4a4_linear_ref(a, s_x, pw, bias, out_dtype=torch.float32)) < 1e-6


# (M, row counts of the joined weights, K, tune) for the int8-MMA decode kernel: tokens padded
# to 16 and 64 rows, weights ending inside a row block, K with a masked last tile, split-K and
# one split, one to three weights.
MMA_DECODE = [
    (9, [40], 192, dict(block_n=16, block_k=64)),
    (16, [33, 17], 200, dict(block_n=16, block_k=64, waves=8)),
    (12, [16, 48, 8], 256, dict(block_n=16, block_k=128, waves=0)),
    (33, [24], 128, dict(block_n=16, block_k=64)),
]


@pytest.mark.parametrize("m,rows,k,tune", MMA_DECODE)
def test_mma_decode_is_the_stacked_references(m: int, rows: list[int], k: int, tune: dict) -> None:
    """w4a8_decode_joined (one launch, split-K through the shared workspace) = each weight's
    reference side by side, for int8 and e4m3 activations; the workspace is zero afterwards."""
    from duquant.kernels.triton_decode import w4a8_decode, w4a8_decode_joined
    a, s_x, weights, scale, zero, bias = _joined_case(m, rows, k, seed=30)
    for acts, b in ((a, None), (a, bias), (a.to(torch.float32).to(torch.float8_e4m3fn), bias)):
        y = w4a8_decode_joined(acts, s_x, [w.packed for w in weights], scale, zero, b, out_dtype=torch.float32,
                               **tune)
        _assert_stacked(y, a, s_x, weights, b)
    one = w4a8_decode(a, s_x, weights[0].packed, weights[0].scale, weights[0].zero, None, torch.float32, **tune)
    assert _rel(one, ref.w4a4_linear_ref(a, s_x, weights[0], None, out_dtype=torch.float32)) < 1e-6
    assert _workspace_clean()


def test_ops_joined_linear_above_the_gemv_uses_one_mma_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.w4a4_linear_joined between DECODE_GEMV_MAX_M and DECODE_MAX_M tokens: one int8-MMA
    decode launch for all the weights; a single linear there takes the same kernel."""
    from duquant.kernels import ops
    from duquant.kernels import triton_decode as dec
    monkeypatch.setenv("DUQUANT_TRITON_INTERPRET", "1")
    calls = []
    real = dec.w4a8_decode_joined
    monkeypatch.setattr(dec, "w4a8_decode_joined",
                        lambda *args, **kw: calls.append(len(args[2])) or real(*args, **kw))
    m = ops.DECODE_GEMV_MAX_M + 3
    a, s_x, weights, scale, zero, _ = _joined_case(m, [40, 24, 24], 128, seed=40)
    y = ops.w4a4_linear_joined(a.reshape(1, m, 128), s_x.reshape(1, m), weights, scale, zero, out_dtype=torch.float32)
    assert calls == [3] and y.shape == (1, m, 88)
    yr = torch.cat([ref.w4a4_linear_ref(a, s_x, w, None, out_dtype=torch.float32) for w in weights], dim=-1)
    assert _rel(y.reshape(m, 88), yr) < 1e-6
    calls.clear()
    y1 = ops.w4a4_linear(a, s_x, weights[0], None, out_dtype=torch.float32)
    assert calls == [1] and _rel(y1, yr[:, :40]) < 1e-6


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q.float()


# (M, K, n, rows of the stacked weights, fused op, dtype, precise, GEMV tiles): one and three
# weights, padded blocks (192/64, 384/128), split-K and one split, RMSNorm and SwiGLU fused,
# fp16, the precise mode's scratch-row gather, 8 tokens on 8 warps.
FUSED_DECODE = [
    (1, 256, 64, [40], None, torch.bfloat16, False, dict(block_n=16, block_k=64)),
    (3, 192, 64, [24, 16, 8], "RMSNorm", torch.bfloat16, False, dict(block_n=8, block_k=64, waves=8)),
    (2, 384, 128, [48], "SwiGLU", torch.float16, False, dict(block_n=16, block_k=128, waves=0)),
    (8, 256, 64, [32, 32], "RMSNorm", torch.float32, True, dict(block_n=16, block_k=64, num_warps=8)),
]


@pytest.mark.parametrize("m, k, n, rows, op, dtype, precise, tune", FUSED_DECODE)
def test_transform_inside_the_gemv_is_the_two_launches(m: int, k: int, n: int, rows: list[int], op: str | None,
                                                      dtype: torch.dtype, precise: bool, tune: dict) -> None:
    """triton_fused_decode.transform_gemv (producers transform, GEMV programs wait on their flag)
    gives what the rows transform followed by the joined GEMV gives, bit for bit, and leaves its
    flag, exit counter and the GEMV's split-K workspace at zero."""
    from duquant.kernels import triton_fused_decode as fd
    from duquant.kernels.norm import InputNorm
    from duquant.kernels.triton_decode import w4a8_gemv_joined
    from duquant.kernels.triton_row_transform import duquant_quantize_rows
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen)
    x[:, 5] *= 20
    x = x.to(dtype)
    norm = InputNorm(torch.rand(k, generator=gen) + 0.5, 1e-5) if op == "RMSNorm" else None
    up = torch.randn(m, k, generator=gen).to(dtype) if op == "SwiGLU" else None
    r1, r2, perm = _orthogonal(n, gen), _orthogonal(n, gen), torch.randperm(k, generator=gen)
    weights = [quantize_weight(torch.randn(r, k, generator=gen)) for r in rows]
    scale, zero = torch.cat([w.scale for w in weights]), torch.cat([w.zero for w in weights])
    bias = torch.randn(sum(rows), generator=gen)
    packed = [w.packed for w in weights]
    y = fd.transform_gemv(x, r1, perm, r2, None, packed, scale, zero, bias, out_dtype=torch.float32, precise=precise,
                          norm=norm, up=up, **tune)
    a, s = duquant_quantize_rows(x, r1, perm, r2, None, precise=precise, norm=norm, up=up)
    want = w4a8_gemv_joined(a, s, packed, scale, zero, bias, torch.float32, **tune)
    assert y.shape == (m, sum(rows)) and torch.equal(y, want)
    assert all(not bool(buf.any()) for buf in fd._SYNC.values()) and _workspace_clean()


def test_decode_step_runs_the_transform_inside_the_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode-sized forward (2 sequences × 1 token) of a tiny W4A4 DuQuant model on the kernels
    with DUQUANT_FUSED_DECODE on: each layer's four linear groups (q/k/v, o, gate/up, down) are
    one fused launch each, and the logits are those of the two-launch path (the default)."""
    from conftest import tiny_model

    from duquant import QuantConfig, quantize
    from duquant.kernels import ops
    from duquant.kernels import triton_fused_decode as fd
    from duquant.modeling.real_linear import to_real_backend
    model = tiny_model("llama")
    tokens = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    quantize(model, QuantConfig(method="duquant", rotation_steps=8), tokens, device="cpu", batch_size=2,
             progress=False)
    to_real_backend(model)
    monkeypatch.setenv("DUQUANT_TRITON_INTERPRET", "1")
    calls = []
    real = fd.transform_gemv
    monkeypatch.setattr(fd, "transform_gemv", lambda *a, **kw: calls.append(len(a[5])) or real(*a, **kw))
    step = tokens[:, :1]
    monkeypatch.setattr(ops, "FUSED_DECODE", True)
    with torch.no_grad():
        got = model(input_ids=step).logits
        assert calls == [3, 1, 2, 1] * model.config.num_hidden_layers
        monkeypatch.setattr(ops, "FUSED_DECODE", False)
        want = model(input_ids=step).logits
    assert len(calls) == 4 * model.config.num_hidden_layers
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())


@pytest.mark.parametrize("m, k, n, sub", [(1, 256, 64, 1), (7, 192, 64, 1), (33, 256, 128, 1), (70, 256, 64, 2)])
def test_transform_three_launch_matches_reference(m: int, k: int, n: int, sub: int) -> None:
    """Precise mode (float32 scratch, 3×TF32 products; exact float32 in the interpreter) gives
    the reference codes; fast mode (bf16 operands) flips a few codes by one step."""
    from duquant.kernels.triton_transform import duquant_quantize
    gen = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    x[:, 3] *= 20  # an outlier channel
    rot1, rot2, perm = _orthogonal(n, gen), _orthogonal(n, gen), torch.randperm(k, generator=gen)
    smooth = torch.rand(k, generator=gen) + 0.5
    ar, sr = ref.transform_quantize_ref(x, rot1, perm, rot2, smooth, 4, 0.9)
    a, s = duquant_quantize(x, rot1, perm, rot2, smooth, 4, 0.9, torch.int8, True, block_m=16, sub_tiles=sub)
    assert torch.equal(a, ar) and float(((s - sr).abs() / sr).max()) < 1e-5
    a, s = duquant_quantize(x, rot1, perm, rot2, smooth, 4, 0.9, torch.int8, False, sub_tiles=sub)
    diff = (a.to(torch.int16) - ar.to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 3e-2
    assert float(((s - sr).abs() / sr).max()) < 2e-2


@pytest.mark.parametrize("m, k, had", [(3, 192, 12), (5, 256, 1)])
def test_hadamard_three_launch_matches_reference(m: int, k: int, had: int) -> None:
    from duquant.kernels.triton_hadamard import hadamard_quantize
    from duquant.transforms.hadamard import _base_matrix
    had_m = None if had == 1 else _base_matrix(had).float()
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    a, s = hadamard_quantize(x, had_m, 4, 0.9, torch.int8, True)
    ar, sr = ref.hadamard_quantize_ref(x, had_m, 4, 0.9)
    assert torch.equal(a, ar) and float(((s - sr).abs() / sr).max()) < 1e-5


@pytest.mark.parametrize("m, k, n", [(1, 256, 64), (7, 192, 64), (33, 256, 128), (5, 1536, 128), (3, 576, 64)])
@pytest.mark.parametrize("stages", ["all", "rotations only", "perm and smooth only"])
def test_row_transform_matches_reference(m: int, k: int, n: int, stages: str) -> None:
    """Whole rows per program, blocks padded to a power of two (192/64 = 3, 1536/128 = 12,
    576/64 = 9 blocks), several tokens per program: precise mode gives the reference codes."""
    from duquant.kernels.triton_row_transform import duquant_quantize_rows
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    x[:, 3] *= 20
    r1, r2, perm = _orthogonal(n, gen), _orthogonal(n, gen), torch.randperm(k, generator=gen)
    smooth = torch.rand(k, generator=gen) + 0.5
    args = {"all": (r1, perm, r2, smooth), "rotations only": (r1, None, r2, None),
            "perm and smooth only": (None, perm, None, smooth)}[stages]
    ar, sr = ref.transform_quantize_ref(x, *args, 4, 0.9)
    a, s = duquant_quantize_rows(x, *args, 4, 0.9, torch.int8, True)
    assert torch.equal(a, ar) and float(((s - sr).abs() / sr).max()) < 1e-5
    a, s = duquant_quantize_rows(x, *args, 4, 0.9, torch.int8, False)
    diff = (a.to(torch.int16) - ar.to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 3e-2
    # the quantizer through a reciprocal: a code moves only next to a rounding boundary
    a, s = duquant_quantize_rows(x, *args, 4, 0.9, torch.int8, True, fast_quant=True)
    diff = (a.to(torch.int16) - ar.to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-2
    assert float(((s - sr).abs() / sr).max()) < 1e-5


@pytest.mark.parametrize("kernel", ["tiles", "rows", "hadamard"])
def test_symmetric_activations_match_reference(kernel: str) -> None:
    """QuaRot's symmetric per-token quantization (Δ = clip·max|y| / 7, z = 8) in each
    transform kernel: the reference codes (precise mode), all within [−8, 7]."""
    from duquant.kernels.triton_hadamard import hadamard_quantize
    from duquant.kernels.triton_row_transform import duquant_quantize_rows
    from duquant.kernels.triton_transform import duquant_quantize
    gen = torch.Generator().manual_seed(3)
    m, k, n = 9, 256, 64
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    x[:, 5] *= 30
    if kernel == "hadamard":
        a, s = hadamard_quantize(x, None, 4, 0.9, torch.int8, True, symmetric=True)
        ar, sr = ref.hadamard_quantize_ref(x, None, 4, 0.9, symmetric=True)
    else:
        args = (_orthogonal(n, gen), torch.randperm(k, generator=gen), _orthogonal(n, gen), None)
        fn = duquant_quantize if kernel == "tiles" else duquant_quantize_rows
        a, s = fn(x, *args, 4, 0.9, torch.int8, True, symmetric=True)
        ar, sr = ref.transform_quantize_ref(x, *args, 4, 0.9, symmetric=True)
    assert -8 <= int(ar.min()) and int(ar.max()) <= 7
    assert int(ar.min()) == -8 or int(ar.max()) == 7  # the clipped abs-max reaches the end of the range
    assert torch.equal(a, ar) and float(((s - sr).abs() / sr).max()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel, weighted", [("tiles", True), ("tiles", False), ("hadamard", True), ("rows", True),
                                              ("rows", False)])
def test_fused_rms_norm_matches_norm_then_transform(kernel: str, weighted: bool, dtype: torch.dtype) -> None:
    """norm=InputNorm(w, eps): the kernel normalises x and rounds it as transformers' RMSNorm
    does (fp16: the normalised row, then its product with w); the reference runs that RMSNorm
    first. Same codes up to rare one-step flips, same scales; a second call gives the same bits."""
    from duquant.kernels import triton_transform as tt
    from duquant.kernels.norm import InputNorm, rms_norm_ref
    from duquant.kernels.triton_hadamard import hadamard_quantize
    from duquant.kernels.triton_row_transform import duquant_quantize_rows
    gen = torch.Generator().manual_seed(11)
    m, k, n = 19, 192, 64
    x = torch.randn(m, k, generator=gen) * (torch.rand(m, 1, generator=gen) * 50 + 0.1)  # rms differs per token
    x[:, 7] *= 25
    x = x.to(dtype)
    norm = InputNorm((torch.rand(k, generator=gen) + 0.5).to(dtype) if weighted else None, 1e-5)
    if kernel == "hadamard":
        from duquant.transforms.hadamard import _base_matrix
        had_m = _base_matrix(12).float()
        run = lambda: hadamard_quantize(x, had_m, 4, 0.9, torch.int8, True, norm=norm)  # noqa: E731
        ar, sr = ref.hadamard_quantize_ref(rms_norm_ref(x, norm), had_m, 4, 0.9)
    else:
        args = (_orthogonal(n, gen), torch.randperm(k, generator=gen), _orthogonal(n, gen), None)
        fn = duquant_quantize_rows if kernel == "rows" else tt.duquant_quantize
        run = lambda: fn(x, *args, 4, 0.9, torch.int8, True, norm=norm)  # noqa: E731
        ar, sr = ref.transform_quantize_ref(rms_norm_ref(x, norm), *args, 4, 0.9)
    first = None
    for _ in range(2):
        a, s = run()
        _check_fused_input_codes(a, s, ar, sr, dtype)
        if first is not None:  # Σx² is added up in a fixed order: the same bits every call
            assert torch.equal(a, first[0]) and torch.equal(s, first[1])
        first = (a, s)


def _check_fused_input_codes(a: torch.Tensor, s: torch.Tensor, ar: torch.Tensor, sr: torch.Tensor,
                             dtype: torch.dtype) -> None:
    """A fused-input kernel against its reference. fp16: the kernel rounds the fused op's output
    as the model does, so the codes are the reference's and the scales agree to a few ulps
    (session 11's unrounded kernels flipped ~1e-3 of the codes and were 5e-4 off in scale)."""
    diff = (a.to(torch.int16) - ar.to(torch.int16)).abs()
    if dtype == torch.float16:
        assert torch.equal(a, ar) and float(((s - sr).abs() / sr).max()) < 1e-5
    else:
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-2
        assert float(((s - sr).abs() / sr).max()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel", ["tiles", "hadamard", "rows"])
def test_fused_swiglu_matches_silu_times_up_then_transform(kernel: str, dtype: torch.dtype) -> None:
    """up=...: the kernel transforms silu(x)·up (x the gate projection) rounded as PyTorch
    rounds it in the inputs' dtype; the reference forms it in that dtype."""
    from duquant.kernels.norm import swiglu_ref
    from duquant.kernels.triton_hadamard import hadamard_quantize
    from duquant.kernels.triton_row_transform import duquant_quantize_rows
    from duquant.kernels.triton_transform import duquant_quantize
    from duquant.transforms.hadamard import _base_matrix
    gen = torch.Generator().manual_seed(5)
    m, k, n = 13, 192, 64
    gate, up = torch.randn(m, k, generator=gen) * 3, torch.randn(m, k, generator=gen)
    up[:, 9] *= 40
    gate, up = gate.to(dtype), up.to(dtype)
    if kernel == "hadamard":
        had_m = _base_matrix(12).float()
        a, s = hadamard_quantize(gate, had_m, 4, 0.9, torch.int8, True, up=up)
        ar, sr = ref.hadamard_quantize_ref(swiglu_ref(gate, up), had_m, 4, 0.9)
    else:
        args = (_orthogonal(n, gen), torch.randperm(k, generator=gen), _orthogonal(n, gen), None)
        fn = duquant_quantize_rows if kernel == "rows" else duquant_quantize
        a, s = fn(gate, *args, 4, 0.9, torch.int8, True, up=up)
        ar, sr = ref.transform_quantize_ref(swiglu_ref(gate, up), *args, 4, 0.9)
    _check_fused_input_codes(a, s, ar, sr, dtype)


@pytest.mark.parametrize("symmetric,clip", [(False, 0.9), (False, 1.0), (True, 0.85)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fake_quant_kernel_is_the_torch_quantizer_bit_for_bit(symmetric: bool, clip: float, dtype) -> None:
    """triton_fake_quant = fake_quantize(y.to(dtype), spec) exactly (the interpreter truncates
    float32 -> bf16, so bf16 is checked on the GPU only): odd K, an outlier row, a constant row."""
    from duquant.kernels.triton_fake_quant import fake_quantize_rows
    from duquant.quant.quantizer import MIN_SCALE, QuantSpec, fake_quantize
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(2, 5, 200, generator=gen)
    y[0, 1, 7] = 300.0
    y[1, 2] = 0.75
    spec = QuantSpec(bits=4, symmetric=symmetric, clip=clip)
    out = fake_quantize_rows(y, dtype, 4, symmetric, clip, MIN_SCALE)
    assert out.dtype == dtype and out.shape == y.shape
    assert torch.equal(out, fake_quantize(y.to(dtype), spec))


@pytest.mark.parametrize("b, hq, hk, s, d, cos_batch", [(1, 9, 3, 1, 64, 1), (2, 4, 4, 7, 128, 2), (3, 5, 1, 2, 16, 1)])
def test_rotary_embedding_matches_reference(b: int, hq: int, hk: int, s: int, d: int, cos_batch: int) -> None:
    """Queries and keys in one launch: transposed [B, S, H, D] views in (as transformers passes
    them), GQA (fewer key heads), head counts not powers of two, cos/sin shared by the batch or not.
    Float32 is exact (the interpreter truncates bf16)."""
    from duquant.kernels.triton_rope import rotary_embedding, supported
    gen = torch.Generator().manual_seed(b * 100 + d)
    q = torch.randn(b, s, hq, d, generator=gen).transpose(1, 2)
    k = torch.randn(b, s, hk, d, generator=gen).transpose(1, 2)
    ang = torch.randn(cos_batch, s, d // 2, generator=gen)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    assert supported(q, k, cos, sin)
    qo, ko = rotary_embedding(q, k, cos, sin)
    qr, kr = ref.rotary_embedding_ref(q, k, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    assert torch.allclose(qo, qr, atol=1e-6, rtol=0) and torch.allclose(ko, kr, atol=1e-6, rtol=0)


def test_fused_rotary_model_matches_stock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny LLaMA with `fuse_rotary` runs the kernel (counted) and gives the stock logits,
    with and without a KV cache."""
    from conftest import tiny_model
    from duquant.kernels import triton_rope
    from duquant.modeling.fused_rope import fuse_rotary
    monkeypatch.setenv("DUQUANT_TRITON_INTERPRET", "1")
    calls = []
    real = triton_rope.rotary_embedding
    monkeypatch.setattr(triton_rope, "rotary_embedding", lambda *a: calls.append(a[0].shape) or real(*a))
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
        fuse_rotary(model)
        got = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        step = model(ids[:, 5:], past_key_values=out.past_key_values).logits
    assert len(calls) == 3 * len(model.model.layers)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(step[:, -1], want[:, -1], atol=1e-5)


@pytest.mark.parametrize("shape, with_weight", [((1, 576), True), ((2, 7, 100), True), ((33, 64), False)])
def test_rms_norm_matches_transformers(shape: tuple[int, ...], with_weight: bool) -> None:
    """The one-kernel RMSNorm against transformers' LlamaRMSNorm: odd row counts and widths,
    a leading batch dimension, no weight. Float32 (the interpreter truncates bf16)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from duquant.kernels.triton_rms_norm import rms_norm, supported
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=gen) * 3
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0, generator=gen)
        want = norm(x) if with_weight else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    weight = norm.weight.detach() if with_weight else None
    assert supported(x, weight)
    got = rms_norm(x, weight, 1e-5)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.allclose(got, want, rtol=2e-6, atol=1e-6)


def test_quantize_through_calibration_kernels_matches_stock_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """DuQuant calibration with RMSNorm and RoPE on kernels (counted) gives the quantized model
    of the stock ops, and leaves the model's own ops in place afterwards."""
    import importlib

    from conftest import tiny_model
    from duquant.config import QuantConfig
    from duquant.kernels import triton_rms_norm, triton_rope
    from duquant.modeling.fused_rms_norm import is_fused
    pipeline = importlib.import_module("duquant.quantize")
    monkeypatch.setenv("DUQUANT_TRITON_INTERPRET", "1")
    calls = []
    for module, name in ((triton_rms_norm, "rms_norm"), (triton_rope, "rotary_embedding")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))

    def quantized_logits() -> torch.Tensor:
        model = tiny_model("llama")
        pipeline.quantize(model, QuantConfig(method="duquant", rotation_steps=8), tokens, device="cpu",
                          batch_size=2, progress=False)
        assert not any(is_fused(m) for m in model.modules())
        with torch.no_grad():
            return model(ids).logits

    with monkeypatch.context() as stock:
        stock.setattr(pipeline, "calibration_kernels", lambda *_: contextlib.nullcontext())
        want = quantized_logits()
    assert calls == []
    got = quantized_logits()
    layers = len(tiny_model("llama").model.layers)
    assert calls.count("rotary_embedding") >= 3 * layers and calls.count("rms_norm") >= 6 * layers
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3), (got - want).abs().max()


def _heads(b: int, h: int, t: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[B, H, T, D] as transformers hands attention operands over: a transposed [B, T, H, D] view,
    with an outlier and a constant row."""
    x = torch.randn(b, t, h, d, generator=torch.Generator().manual_seed(seed)).transpose(1, 2)
    x[0, 0, 0, 3] = 40.0
    x[-1, -1, -1] = 0.5
    return x.to(dtype)


@pytest.mark.parametrize("d, hadamard", [(64, True), (128, True), (40, True), (64, False), (24, False)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_kv_fake_quant_kernel_matches_hadamard_then_quantizer(d: int, hadamard: bool, symmetric: bool) -> None:
    """triton_kv_quant.fake_quantize_heads = fake_quantize(apply_hadamard(x), spec) per (token, head):
    bit for bit without the Hadamard; with it, the float32 sums may round differently: a scale
    may differ in its last bits and a code move by one step here and there."""
    from duquant.kernels.triton_kv_quant import fake_quantize_heads
    from duquant.quant.quantizer import MIN_SCALE, QuantSpec, fake_quantize
    from duquant.transforms.hadamard import apply_hadamard, hadamard_on
    x = _heads(2, 3, 7, d, torch.float32)
    spec = QuantSpec(bits=4, symmetric=symmetric, clip=0.9)
    h = hadamard_on(d, x.device, torch.float32) if hadamard else None
    got = fake_quantize_heads(x, h, 4, symmetric, 0.9, MIN_SCALE)
    want = fake_quantize(apply_hadamard(x) if hadamard else x, spec)
    assert got.shape == x.shape and got.is_contiguous()
    if not hadamard:
        assert torch.equal(got, want)
    else:
        step = (want.amax(-1) - want.amin(-1)).max() / 15
        assert float((got - want).abs().max()) <= float(step) * 1.01
        moved = ~torch.isclose(got, want, rtol=1e-5, atol=1e-6)  # a code one step away (the scale's last bits aside)
        assert float(moved.float().mean()) < 0.02


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_store_and_load_kernels_match_the_row_codes(bits: int) -> None:
    """store_row_codes writes encode_rows' codes/scales/zeros at the device position (rows past the
    cache's end are dropped, the others stay zero); dequantize_row_codes is decode_rows."""
    from duquant.kernels.triton_kv_quant import dequantize_row_codes, store_row_codes
    from duquant.quant.quantizer import MIN_SCALE, QuantSpec
    from duquant.quant.row_codes import decode_rows, encode_rows, zero_rows
    spec = QuantSpec(bits=bits, symmetric=False, clip=1.0)
    x = _heads(2, 3, 5, 64, torch.float32, seed=1)
    parts = zero_rows(2, 3, 12, 64, spec, torch.float32, x.device)
    store_row_codes(x, None, *parts, torch.tensor(4), bits, False, 1.0, MIN_SCALE)
    want = encode_rows(x, spec)
    for part, new in zip(parts, want):
        assert torch.equal(part[:, :, 4:9], new)
        assert not part[:, :, :4].any() and not part[:, :, 9:].any()
    assert torch.equal(dequantize_row_codes(*parts, bits, 64, torch.float32), decode_rows(parts, spec, torch.float32))
    store_row_codes(x, None, *parts, torch.tensor(9), bits, False, 1.0, MIN_SCALE)  # 3 of 5 rows fit
    assert torch.equal(parts[0][:, :, 9:12], want[0][:, :, :3])


def test_static_kv_cache_on_kernels_decodes_like_the_growing_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A W16A16-QKV4 DuQuant model (tiny LLaMA): StaticQuantizedKVCache through the kernels (Q, K, V
    quantizer, cache write, cache read at the prompt, attention from the codes at one-token steps)
    gives QuantizedKVCache's logits (PyTorch ops, SDPA) step by step."""
    from conftest import tiny_model
    from test_kv_cache import SETTINGS, incremental_logits

    from duquant import QuantConfig, quantize
    from duquant.modeling.kv_cache import QuantizedKVCache, StaticQuantizedKVCache
    model = tiny_model("llama")
    tokens = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    quantize(model, QuantConfig(**SETTINGS["duquant-qkv4"]), tokens, device="cpu", batch_size=2, progress=False)
    from duquant.kernels import triton_decode_attention as da
    from duquant.kernels import triton_kv_quant as kv
    want = incremental_logits(model, tokens, 5, QuantizedKVCache(model))
    monkeypatch.setenv("DUQUANT_TRITON_INTERPRET", "1")
    calls = {"store": 0, "load": 0, "heads": 0, "attend": 0}

    def counted(fn, key):
        def call(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return call

    for name, key in (("store_row_codes", "store"), ("dequantize_row_codes", "load"), ("fake_quantize_heads", "heads")):
        monkeypatch.setattr(kv, name, counted(getattr(kv, name), key))
    monkeypatch.setattr(da, "decode_attention", counted(da.decode_attention, "attend"))
    got = incremental_logits(model, tokens, 5, StaticQuantizedKVCache(model, max_cache_len=16))
    steps, layers = 1 + 7, model.config.num_hidden_layers
    assert calls == {"store": 2 * layers * steps, "load": 2 * layers, "heads": layers * steps,
                     "attend": layers * (steps - 1)}
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())


@pytest.mark.parametrize("variant", ["fold", "unfolded", "dot", "grouped"])
@pytest.mark.parametrize("b, hq, hkv, length, d, masked", [(2, 6, 2, 150, 64, True), (1, 2, 2, 70, 128, False),
                                                           (3, 4, 1, 33, 16, True)])
def test_decode_attention_from_codes_matches_sdpa(b: int, hq: int, hkv: int, length: int, d: int, masked: bool,
                                                  variant: str) -> None:
    """triton_decode_attention over 4-bit codes = SDPA over the dequantized cache (GQA, splits of the
    positions, a padding + causal mask shared by the batch or per sequence, or no mask), with the
    row scale and zero folded out of the per-element work, without, with the products on the
    tensor cores (probabilities rounded to fp16: a looser tolerance), and the default: those
    products with a KV head's query heads as their rows."""
    import torch.nn.functional as F

    from duquant.kernels.triton_decode_attention import decode_attention
    from duquant.quant.quantizer import QuantSpec
    from duquant.quant.row_codes import decode_rows, encode_rows
    gen = torch.Generator().manual_seed(length)
    spec = QuantSpec(bits=4, symmetric=False, clip=1.0)
    keys, values = (encode_rows(torch.randn(b, hkv, length, d, generator=gen) * 2, spec) for _ in range(2))
    query = torch.randn(b, hq, 1, d, generator=gen)
    mask = None
    if masked:
        mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
        mask[..., length - 5:] = False  # positions not written yet
        mask[0, ..., :7] = False  # left padding of the first sequence
    out = decode_attention(query, keys, values, mask, 0.3, fold=variant != "unfolded", dot=variant in ("dot", "grouped"),
                           grouped=variant == "grouped")
    k = decode_rows(keys, spec, torch.float32).repeat_interleave(hq // hkv, dim=1)
    v = decode_rows(values, spec, torch.float32).repeat_interleave(hq // hkv, dim=1)
    want = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    assert out.shape == (b, 1, hq, d)
    tol = 2e-3 if variant in ("dot", "grouped") else 2e-5  # the dot rounds p·s to fp16
    assert torch.allclose(out, want, atol=tol, rtol=tol / 2), float((out - want).abs().max())
