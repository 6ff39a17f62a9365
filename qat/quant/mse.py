"""MSE-optimal clipping (Choukroun et al. 2019, §3.1 eq. 3-5; whitepaper §3.1 "MSE" range setting).

For each row of a (channels, elements) matrix, search clipping ratios r in (0, 1] of the observed range
[r·min, r·max] and keep the one whose quantize-dequantize error ||x - Q(x)||² is smallest. The search is
vectorized over channels; the optimum is exact to the grid step (1/``grid`` of the observed range).

Rows longer than ``HISTOGRAM_MIN_ELEMENTS`` (activations) are searched on a histogram: exact counts n per bin
over every element, and each bin's mean m and variance from a fixed random sample of at most ``SAMPLE``
elements. The error of a bin whose values all round to one level v is exactly n((m - v)² + var), so the
search departs from the exact one only through bins that straddle a rounding boundary and the sampling of m
and var. With ``BINS`` = 2048 the chosen range's true MSE is within 1% of the exact search's
(tests/test_mse.py), at the cost of a few passes over the data instead of ``grid``.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from qat.quant.observers import MinMaxObserver
from qat.quant.scheme import QuantSpec, choose_qparams
from qat.quant.state import store_range

BINS = 2048
HISTOGRAM_MIN_ELEMENTS = 8 * BINS
SAMPLE = 1 << 16  # longer rows are histogrammed on this many elements drawn with a fixed seed


def mse_optimal_range(rows: torch.Tensor, spec: QuantSpec, grid: int = 100,
                      exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (low, high) clipping range minimizing the mean squared quantization error.

    ``exact=None`` searches long rows on a histogram (see the module docstring) and short ones exactly.
    """
    rows = rows.detach().float()
    if exact is False or (exact is None and rows.shape[1] >= HISTOGRAM_MIN_ELEMENTS):
        return _histogram_search(rows, spec, grid)
    low0 = rows.amin(dim=1).clamp(max=0.0)
    high0 = rows.amax(dim=1).clamp(min=0.0)
    best_err = torch.full_like(low0, float("inf"))
    best_low, best_high = low0.clone(), high0.clone()
    for k in range(1, grid + 1):
        ratio = k / grid
        low, high = low0 * ratio, high0 * ratio
        scale, zero_point = choose_qparams(low, high, spec)
        scale, zero_point = scale.unsqueeze(1), zero_point.unsqueeze(1).float()
        q = torch.clamp(torch.round(rows / scale) + zero_point, spec.qmin, spec.qmax)
        err = ((q - zero_point) * scale - rows).square().mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_low = torch.where(better, low, best_low)
        best_high = torch.where(better, high, best_high)
    return best_low, best_high


@functools.lru_cache(maxsize=64)
def _sample_indices(length: int, device: torch.device) -> torch.Tensor:
    """The fixed sample's indices, drawn on the CPU (the same on every device) and moved to ``device``."""
    return torch.randint(0, length, (SAMPLE,), generator=torch.Generator().manual_seed(0)).to(device)


def _histogram_search(rows: torch.Tensor, spec: QuantSpec, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    low0, high0 = torch.aminmax(rows, dim=1)
    low0, high0 = low0.clamp(max=0.0), high0.clamp(min=0.0)
    width = (high0 - low0).clamp(min=1e-12)
    # exact counts per bin over every element (tails included) ...
    count = torch.stack([torch.histc(row, BINS, float(lo), float(hi)) for row, lo, hi in zip(rows, low0, high0,
                                                                                             strict=True)]).double()
    # ... and each bin's mean and variance from a fixed random sample (bin centre and w²/12 where it has none)
    sample = rows
    if rows.shape[1] > SAMPLE:
        sample = rows[:, _sample_indices(rows.shape[1], rows.device)]
    index = ((sample - low0[:, None]) / width[:, None] * BINS).long().clamp_(0, BINS - 1)
    n = torch.zeros_like(count).scatter_add_(1, index, torch.ones_like(sample, dtype=torch.float64))
    total = torch.zeros_like(count).scatter_add_(1, index, sample.double())
    squares = torch.zeros_like(count).scatter_add_(1, index, sample.double().square())
    bin_width = (width.double() / BINS)[:, None]
    centre = low0.double()[:, None] + (torch.arange(BINS, dtype=torch.float64, device=rows.device) + 0.5) * bin_width
    mean = torch.where(n > 0, total / n.clamp(min=1), centre)
    var = torch.where(n > 1, (squares / n.clamp(min=1) - mean.square()).clamp(min=0), bin_width.square() / 12)
    # every candidate ratio at once: (rows, grid, bins)
    ratios = torch.arange(1, grid + 1, dtype=torch.float32, device=rows.device) / grid
    low, high = low0[:, None] * ratios, high0[:, None] * ratios
    scale, zero_point = choose_qparams(low, high, spec)
    scale, zero_point = scale[..., None], zero_point.float()[..., None]
    mean, var, count = mean.float()[:, None, :], var.float()[:, None, :], count.float()[:, None, :]
    level = (torch.clamp(torch.round(mean / scale) + zero_point, spec.qmin, spec.qmax) - zero_point) * scale
    # Σ(x - v)² = n((m - v)² + var) per bin
    err = (count * ((mean - level).square() + var)).sum(dim=2, dtype=torch.float64)
    best = err.argmin(dim=1, keepdim=True)  # first minimum, like the exact search's strict "<"
    return low.gather(1, best)[:, 0], high.gather(1, best)[:, 0]


class MseObserver(MinMaxObserver):
    """Range = MSE-optimal clipping of each batch; per channel for weights, running mean over batches
    for activations (calibration data).

    Under data parallelism (:mod:`qat.quant.range_sync`) the ranks' batch optima of an activation are averaged
    before the running mean, which then equals (up to float rounding) a single process seeing the ranks'
    shards as separate batches; the MSE optimum of the concatenated global batch would need its data. The
    weight search (``running=False``) depends on the weight tensor alone and is not communicated.
    """

    sync = "mean"

    def __init__(self, spec: QuantSpec, per_channel: bool = False, ch_axis: int = 0, grid: int = 100,
                 running: bool = True) -> None:
        super().__init__(per_channel, ch_axis)
        self.spec = spec
        self.grid = grid
        self.running = running
        if not running:
            self.sync = None
        self.register_buffer("batches", torch.tensor(0))
        self._searched: torch.Tensor | None = None  # last weight tensor searched (not saved)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        rows = x.movedim(self.ch_axis, 0).flatten(1) if self.per_channel else x.reshape(1, -1)
        low, high = mse_optimal_range(rows, replace(self.spec, per_channel=False), self.grid)
        return (low, high) if self.per_channel else (low[0], high[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.running:  # weights: the search is repeated only when the tensor changed
            if self._searched is not None and self._searched.shape == x.shape and torch.equal(self._searched, x):
                return x
            self._searched = x.detach().clone()
        low, high = self.observed_range(x)
        if self.running and self.initialized:
            n = float(self.batches)
            low = (self.min_val * n + low) / (n + 1)
            high = (self.max_val * n + high) / (n + 1)
        store_range(self, low, high)
        self.batches += 1
        return x
