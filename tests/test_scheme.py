"""Quantization scheme numerics: hand-computed cases, torch's reference kernels, 0.0 exact, STE."""

from __future__ import annotations

import pytest
import torch

from qat.errors import QatError
from qat.quant.scheme import QuantSpec, choose_qparams, dequantize, fake_quantize, quantize


def test_grid_bounds() -> None:
    assert (QuantSpec(bits=8).qmin, QuantSpec(bits=8).qmax) == (0, 255)
    assert (QuantSpec(bits=8, signed=True).qmin, QuantSpec(bits=8, signed=True).qmax) == (-128, 127)
    narrow = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True)
    assert (narrow.qmin, narrow.qmax) == (-127, 127)
    assert (QuantSpec(bits=4, signed=True).qmin, QuantSpec(bits=4, signed=True).qmax) == (-8, 7)
    assert (QuantSpec(bits=2).qmin, QuantSpec(bits=2).qmax) == (0, 3)
    assert QuantSpec(bits=16, signed=True).qmax == 32767


def test_hand_computed_asymmetric() -> None:
    spec = QuantSpec(bits=8)
    scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), spec)
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zp.item() == 64  # round(0 - (-1) / (4/255)) = round(63.75)
    q = quantize(torch.tensor([-1.0, 0.0, 3.0, 10.0]), scale, zp, spec)
    assert q.tolist() == [0, 64, 255, 255]


def test_hand_computed_symmetric_narrow() -> None:
    spec = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True)
    scale, zp = choose_qparams(torch.tensor(-0.5), torch.tensor(1.27), spec)
    assert scale.item() == pytest.approx(1.27 / 127)
    assert zp.item() == 0
    assert quantize(torch.tensor([1.27, -1.27, -5.0]), scale, zp, spec).tolist() == [127, -127, -127]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8, 12, 16])
@pytest.mark.parametrize("signed", [False, True])
def test_zero_is_exact(bits: int, signed: bool) -> None:
    torch.manual_seed(bits)
    spec = QuantSpec(bits=bits, signed=signed)
    for low, high in [(-0.37, 2.9), (0.5, 3.0), (-4.0, -0.1), (-1e-3, 7.3)]:
        scale, zp = choose_qparams(torch.tensor(low), torch.tensor(high), spec)
        assert fake_quantize(torch.zeros(3), scale, zp, spec).abs().max().item() == 0.0


def test_matches_torch_per_tensor_at_8_bits() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000) * 3
    spec = QuantSpec(bits=8)
    scale, zp = choose_qparams(x.min(), x.max(), spec)
    ours = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
    ref = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp.item()), 0, 255)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(fake_quantize(x, scale, zp, spec), ref, atol=0)


def test_matches_torch_per_channel_at_8_bits() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 3, 16).reshape(-1, 1, 1, 1)
    spec = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True, per_channel=True, ch_axis=0)
    scale, zp = choose_qparams(w.amin(dim=(1, 2, 3)), w.amax(dim=(1, 2, 3)), spec)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -127, 127)
    ours = dequantize(quantize(w, scale, zp, spec), scale, zp, spec)
    assert torch.allclose(ours, ref, atol=1e-6)
    # each channel's largest magnitude lands exactly on +-127
    q = quantize(w, scale, zp, spec)
    assert q.abs().amax(dim=(1, 2, 3)).eq(127).all()


def test_straight_through_gradient() -> None:
    spec = QuantSpec(bits=8)
    scale, zp = choose_qparams(torch.tensor(0.0), torch.tensor(1.0), spec)
    x = torch.tensor([-0.5, 0.2, 0.5, 0.99, 1.5], requires_grad=True)
    fake_quantize(x, scale, zp, spec).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_bits_out_of_range_is_a_clear_error(bits: int) -> None:
    with pytest.raises(QatError, match=r"quant.bits: .*outside \[2, 16\]"):
        QuantSpec(bits=bits)


def test_missing_axis_is_a_clear_error() -> None:
    spec = QuantSpec(bits=8, signed=True, symmetric=True, per_channel=True, ch_axis=3, key="quant.weight")
    with pytest.raises(QatError, match="quant.weight.ch_axis"):
        quantize(torch.zeros(4, 4), torch.ones(4), torch.zeros(4, dtype=torch.int32), spec)


def test_symmetric_needs_signed() -> None:
    with pytest.raises(QatError, match="quant.symmetric"):
        QuantSpec(bits=8, signed=False, symmetric=True)
