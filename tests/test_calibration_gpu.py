"""GPU-only shortcuts of the calibration path give the results of the plain path.

* the greedy rotation loop replayed as a CUDA graph equals the same loop run eagerly;
* the dense Hadamard GEMM used on CUDA for small orders equals the butterfly transform;
* the one-kernel cast + fake quantization equals the PyTorch quantizer bit for bit, alone and
  through a whole calibration (every quantized tensor of the model the same).
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


@pytest.mark.parametrize("k", [128, 576, 4096, 11008])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("symmetric,clip", [(False, 0.9), (False, 1.0), (True, 0.85)])
def test_fake_quant_kernel_equals_torch_quantizer(k, dtype, symmetric, clip):
    from duquant.kernels.triton_fake_quant import fake_quantize_rows
    from duquant.quant.quantizer import MIN_SCALE, QuantSpec, fake_quantize
    gen = torch.Generator(device="cuda").manual_seed(k)
    y = torch.randn(333, k, device="cuda", generator=gen) * torch.rand(333, 1, device="cuda", generator=gen) * 10
    y[3, 5] = 3100.0  # a massive outlier
    y[4] = -0.5  # a constant row (the scale's lower bound)
    y[5] = 0.0
    out = fake_quantize_rows(y, dtype, 4, symmetric, clip, MIN_SCALE)
    assert torch.equal(out, fake_quantize(y.to(dtype), QuantSpec(bits=4, symmetric=symmetric, clip=clip)))


@pytest.mark.parametrize("method", ["duquant", "quarot"])
def test_calibration_with_the_fake_quant_kernel_is_bitwise_the_same(monkeypatch, method):
    """A whole quantization (fp16 model on CUDA: simulated quantized forwards feed the next
    layer's statistics, GPTQ's Hessians, Q/K/V fake quantization) with and without the
    kernel: every tensor of the quantized model and the logits identical."""
    import copy

    from conftest import tiny_model

    from duquant import QuantConfig, quantize
    from duquant.kernels import ops

    base = tiny_model("llama").half().cuda()
    tokens = torch.randint(0, base.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(method=method, rotation_steps=8) if method == "duquant" else QuantConfig(method="quarot")
    results = []
    for kernel in (True, False, False):  # the second PyTorch run: is the calibration deterministic here?
        monkeypatch.setattr(ops, "FAKE_QUANT_KERNEL", kernel)
        model = copy.deepcopy(base)
        quantize(model, config, tokens, device="cuda", batch_size=2, progress=False)
        with torch.no_grad():
            logits = model(input_ids=tokens.cuda()).logits
        results.append((model.state_dict(), logits))
    (sd_kernel, logits_kernel), (sd_torch, logits_torch), (sd_again, _) = results
    if any(not torch.equal(t, sd_again[name]) for name, t in sd_torch.items()):
        pytest.skip("two PyTorch-only calibrations differ on this GPU: bitwise comparison meaningless")
    assert sd_kernel.keys() == sd_torch.keys()
    for name, t in sd_kernel.items():
        assert torch.equal(t, sd_torch[name]), name
    assert torch.equal(logits_kernel, logits_torch)


def test_calibration_through_the_real_kernels_on_cuda(monkeypatch):
    """calib_forward="real" on CUDA: the quantized prefix runs on the Triton kernels (counted),
    the model comes back simulated with the same layout, and it is as good a W4A4 model as
    the simulated calibration's: its logits are as close to the FP model's. (The two are not
    close to each other: the prefixes differ by the kernels' bf16 rotations, and the greedy
    rotations fitted on them differ; on this tiny model the logits differed by 12%.)"""
    import copy

    from conftest import tiny_model

    from duquant import QuantConfig, quantize
    from duquant.modeling import real_linear

    base = tiny_model("llama").half().cuda()
    tokens = torch.randint(0, base.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    calls = []
    original = real_linear.RealQuantLinear._linear
    monkeypatch.setattr(real_linear.RealQuantLinear, "_linear", lambda self, *a: calls.append(1) or original(self, *a))
    models = {"fp": base}
    for forward in ("simulated", "real"):
        models[forward] = copy.deepcopy(base)
        quantize(models[forward], QuantConfig(rotation_steps=8, calib_forward=forward), tokens, device="cuda",
                 batch_size=2, progress=False)
    assert calls
    assert not any(isinstance(m, real_linear.RealQuantLinear) for m in models["real"].modules())
    assert models["real"].state_dict().keys() == models["simulated"].state_dict().keys()
    with torch.no_grad():
        logits = {name: m(input_ids=tokens.cuda()).logits.float() for name, m in models.items()}
    assert torch.isfinite(logits["real"]).all()
    error = {f: float((logits[f] - logits["fp"]).norm() / logits["fp"].norm()) for f in ("simulated", "real")}
    assert error["real"] < 1.25 * error["simulated"] + 0.01, error
