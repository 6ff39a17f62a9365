"""MSE calibration runs on the input's device and gives the CPU's result there (issue 16 item 9).

Activations of at least ``HISTOGRAM_MIN_ELEMENTS`` (16,384) elements take the histogram search, whose tensors
must all be created on the input's device; the CUDA case is skipped where no GPU is visible.
"""

from __future__ import annotations

import pytest
import torch

from qat.quant.mse import HISTOGRAM_MIN_ELEMENTS, SAMPLE, MseObserver, mse_optimal_range
from qat.quant.scheme import QuantSpec

SPEC = QuantSpec(bits=8)
GRID = 100  # MseObserver's and mse_optimal_range's default search grid


def assert_same_range(low: torch.Tensor, high: torch.Tensor, cpu: tuple[torch.Tensor, torch.Tensor],
                      span: torch.Tensor) -> None:
    """Equal to the CPU's range; on another device at most one search step (1/GRID of the observed range) off,
    as CUDA's atomics in histc/scatter_add may order float sums differently and so break a near-tie the other
    way."""
    if low.device.type == "cpu":
        assert torch.equal(low, cpu[0]) and torch.equal(high, cpu[1])
    else:
        step = span / GRID * 1.0001
        assert bool(((low.cpu() - cpu[0]).abs() <= step).all() and ((high.cpu() - cpu[1]).abs() <= step).all())


def _activation(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * 0.5 + 0.2
    x[:7] = torch.tensor([9.0, -4.0, 7.5, 6.0, -3.0, 8.0, 5.0])  # outliers: the optimum clips them
    return x.clamp(0.0, 6.0).reshape(1, -1) if seed % 2 else x.reshape(1, -1)  # odd seeds: after a ReLU6


@pytest.mark.parametrize("numel", [HISTOGRAM_MIN_ELEMENTS, 3 * SAMPLE])  # all elements / a fixed sample
def test_mse_calibration_of_a_large_activation_matches_the_cpu(device: torch.device, numel: int) -> None:
    batches = [_activation(numel, seed).reshape(4, -1) for seed in range(3)]
    results = {}
    for dev in {torch.device("cpu"), device}:
        observer = MseObserver(SPEC).to(dev)  # per tensor, running mean over the batches (calibration)
        for batch in batches:
            observer(batch.to(dev))
        assert observer.min_val.device.type == dev.type and int(observer.batches) == len(batches)
        results[dev.type] = (observer.min_val, observer.max_val)
    low, high = results[device.type]
    data = torch.cat(batches)
    assert_same_range(low, high, results["cpu"], data.max() - data.min())
    assert data.min() <= low.cpu() <= 0.0 <= high.cpu() < data.max()  # clipped the outliers, kept real 0.0


def test_histogram_search_per_row_on_the_device(device: torch.device) -> None:
    rows = torch.cat([_activation(HISTOGRAM_MIN_ELEMENTS, 4), 3 * _activation(HISTOGRAM_MIN_ELEMENTS, 5)])
    low, high = mse_optimal_range(rows.to(device), SPEC, GRID)
    assert low.device.type == device.type and low.shape == (2,)
    assert_same_range(low, high, mse_optimal_range(rows, SPEC, GRID), rows.amax(dim=1) - rows.amin(dim=1))
