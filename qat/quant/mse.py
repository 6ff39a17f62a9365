"""MSE-optimal clipping (Choukroun et al. 2019, §3.1 eq. 3-5; whitepaper §3.1 "MSE" range setting).

For each row of a (channels, elements) matrix, search clipping ratios r in (0, 1] of the observed range
[r·min, r·max] and keep the one whose quantize-dequantize error ||x - Q(x)||² is smallest. The search is
vectorized over channels; the optimum is exact to the grid step (1/``grid`` of the observed range).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qat.quant.observers import MinMaxObserver
from qat.quant.scheme import QuantSpec, choose_qparams


def mse_optimal_range(rows: torch.Tensor, spec: QuantSpec, grid: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (low, high) clipping range minimizing the mean squared quantization error."""
    rows = rows.detach().float()
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


class MseObserver(MinMaxObserver):
    """Range = MSE-optimal clipping of each batch; per channel for weights, running mean over batches
    for activations (calibration data)."""

    def __init__(self, spec: QuantSpec, per_channel: bool = False, ch_axis: int = 0, grid: int = 100,
                 running: bool = True) -> None:
        super().__init__(per_channel, ch_axis)
        self.spec = spec
        self.grid = grid
        self.running = running
        self.register_buffer("batches", torch.tensor(0))

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        rows = x.movedim(self.ch_axis, 0).flatten(1) if self.per_channel else x.reshape(1, -1)
        low, high = mse_optimal_range(rows, replace(self.spec, per_channel=False), self.grid)
        return (low, high) if self.per_channel else (low[0], high[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.batch_range(x)
        if self.running and self.initialized:
            n = float(self.batches)
            low = (self.min_val * n + low) / (n + 1)
            high = (self.max_val * n + high) / (n + 1)
        self.min_val, self.max_val = low, high
        self.batches += 1
        return x
