"""MSE-optimal clipping (Choukroun et al. 2019) against min/max on heavy-tailed tensors."""

from __future__ import annotations

import pytest
import torch

from qat.errors import QatError
from qat.quant.config import QuantConfig
from qat.quant.mse import MseObserver, mse_optimal_range
from qat.quant.scheme import QuantSpec, choose_qparams, fake_quantize


def _mse(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, spec: QuantSpec) -> float:
    scale, zp = choose_qparams(low, high, spec)
    return (fake_quantize(x, scale, zp, spec) - x).square().mean().item()


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_clipping_beats_minmax_on_heavy_tails(bits: int) -> None:
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((20000,))
    spec = QuantSpec(bits=bits, signed=True, symmetric=True)
    low, high = mse_optimal_range(x.reshape(1, -1), spec)
    factor = 0.8 if bits == 4 else 1.0  # the gain is largest at low precision
    assert _mse(x, low[0], high[0], spec) < factor * _mse(x, x.min(), x.max(), spec)
    assert high[0] < x.abs().max()  # it clips


def test_mse_search_is_exact_to_the_grid_step() -> None:
    torch.manual_seed(1)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4000,))
    spec = QuantSpec(bits=4, signed=True, symmetric=True)
    low, high = mse_optimal_range(x.reshape(1, -1), spec, grid=100)
    best = _mse(x, low[0], high[0], spec)
    absmax = x.abs().max()
    fine = min(_mse(x, -absmax * r, absmax * r, spec) for r in torch.linspace(0.01, 1.0, 991))
    assert best <= fine * 1.02  # the 1%-step grid lands within 2% of a 0.1%-step search


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (8, True), (8, False), (4, False)])
def test_histogram_search_is_within_one_percent_of_the_exact_search(bits: int, symmetric: bool) -> None:
    torch.manual_seed(4)
    x = torch.distributions.StudentT(2.5).sample((400000,))  # longer than SAMPLE: the sampled histogram
    x = x if symmetric else torch.relu(x) + 0.1 * x  # asymmetric, like activations after a leaky ReLU
    spec = QuantSpec(bits=bits, signed=symmetric, symmetric=symmetric)
    exact = mse_optimal_range(x.reshape(1, -1), spec, exact=True)
    histogram = mse_optimal_range(x.reshape(1, -1), spec, exact=False)
    assert _mse(x, histogram[0][0], histogram[1][0], spec) <= 1.01 * _mse(x, exact[0][0], exact[1][0], spec)


def test_per_channel_search_is_vectorized_row_by_row() -> None:
    torch.manual_seed(2)
    w = torch.distributions.StudentT(3.0).sample((8, 50)) * torch.linspace(0.1, 2.0, 8).reshape(-1, 1)
    spec = QuantSpec(bits=4, signed=True, symmetric=True, narrow_range=True)
    low, high = mse_optimal_range(w, spec)
    for c in range(8):
        row_low, row_high = mse_optimal_range(w[c : c + 1], spec)
        assert torch.allclose(low[c], row_low[0]) and torch.allclose(high[c], row_high[0])


def test_mse_observer_averages_batches_for_activations() -> None:
    spec = QuantSpec(bits=8)
    obs = MseObserver(spec)
    torch.manual_seed(3)
    a, b = torch.rand(1000) * 2, torch.rand(1000) * 4
    obs(a)
    obs(b)
    la, ha = mse_optimal_range(a.reshape(1, -1), spec)
    lb, hb = mse_optimal_range(b.reshape(1, -1), spec)
    assert obs.max_val.item() == pytest.approx((ha[0] + hb[0]).item() / 2)


def test_unknown_observer_is_a_clear_error() -> None:
    with pytest.raises(QatError, match="quant.act_observer: unknown value 'kl'"):
        QuantConfig(act_observer="kl")
