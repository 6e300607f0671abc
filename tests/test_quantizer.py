import pytest
import torch

from duquant.quant.packing import pack_codes, unpack_codes
from duquant.quant.quantizer import QuantSpec, compute_qparams, dequantize, fake_quantize, quantize


def test_asymmetric_matches_closed_form():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    spec = QuantSpec(bits=2, symmetric=False, clip=1.0)
    scale, zero = compute_qparams(x, spec)
    # Δ = (2 − (−1)) / 3 = 1, z = −round(−1 / 1) = 1
    assert scale.item() == pytest.approx(1.0)
    assert zero.item() == 1.0
    codes = quantize(x, scale, zero, spec)
    # round(x/Δ) + z = [0, 1, 1 (round half to even of 0.5 = 0, +1), 3]
    assert codes.tolist() == [[0, 1, 1, 3]]
    assert dequantize(codes, scale, zero).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_clip_shrinks_range_and_saturates():
    x = torch.tensor([[-10.0, 0.0, 10.0]])
    spec = QuantSpec(bits=4, clip=0.5)
    scale, zero = compute_qparams(x, spec)
    assert scale.item() == pytest.approx(10.0 / 15)
    y = fake_quantize(x, spec)
    # The grid spans the clipped range [−5, 5], shifted by at most one step by the rounded zero point.
    step = 10.0 / 15
    assert y.max().item() <= 5.0 + step and y.min().item() >= -5.0 - step
    assert y.max().item() - y.min().item() == pytest.approx(15 * step)


def test_symmetric_closed_form():
    x = torch.tensor([[-3.0, 1.0, 7.0]])
    spec = QuantSpec(bits=4, symmetric=True)
    scale, zero = compute_qparams(x, spec)
    assert scale.item() == pytest.approx(7.0 / 7)
    assert zero.item() == 8.0
    assert quantize(x, scale, zero, spec).tolist() == [[5, 9, 15]]


def test_per_row_and_groups():
    x = torch.randn(3, 5, 16)
    spec = QuantSpec(bits=4, group_size=8)
    scale, zero = compute_qparams(x, spec)
    assert scale.shape == (3, 5, 2)
    y = fake_quantize(x, spec)
    for g in range(2):
        part = x[..., g * 8 : (g + 1) * 8]
        assert torch.allclose(y[..., g * 8 : (g + 1) * 8], fake_quantize(part, QuantSpec(bits=4)))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_error_bounded_by_half_step(bits):
    x = torch.randn(64, 128)
    spec = QuantSpec(bits=bits)
    scale, _ = compute_qparams(x, spec)
    err = (fake_quantize(x, spec) - x).abs()
    assert (err <= scale / 2 + 1e-6).all()


def test_fake_quant_keeps_dtype_and_none_is_identity():
    x = torch.randn(4, 32, dtype=torch.float16)
    assert fake_quantize(x, QuantSpec(bits=4)).dtype == torch.float16
    assert fake_quantize(x, None) is x


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 16])
def test_fake_quant_is_dequantize_of_quantize_and_leaves_x_alone(symmetric, group_size):
    """The in-place fast path gives exactly quantize → dequantize, and a float32 input
    (which `.to(float32)` does not copy) is not overwritten."""
    x = torch.randn(6, 64) * torch.rand(6, 1) * 8
    before = x.clone()
    spec = QuantSpec(bits=4, symmetric=symmetric, clip=0.9, group_size=group_size)
    scale, zero = compute_qparams(x, spec)
    expected = dequantize(quantize(x, scale, zero, spec), scale, zero, group_size)
    assert torch.equal(fake_quantize(x, spec), expected)
    assert torch.equal(x, before)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_spec_rejects_bits(bits):
    with pytest.raises(ValueError):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (7, 32), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    if bits <= 4:
        assert packed.shape == (7, 16)
    assert torch.equal(unpack_codes(packed, bits), codes)
