"""Models for latency only: random weights, realistic BN statistics and activation ranges, no download.

Latency does not depend on the weight values, but integer models need quantization ranges: the float model's
BN running statistics are set from a few random batches (train-mode forward passes, Jacob §3.2 folding then
uses them), the model is prepared with simulated quantization (:func:`qat.quant.prepare.prepare`),
calibrated on random batches and converted to the canonical integer model (Jacob §2, eq. 7).
"""

from __future__ import annotations

import torch
from torch import nn

from qat.intmodel.convert import convert
from qat.intmodel.graph import IntModel
from qat.models import build_model
from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare


def random_float_model(arch: str, *, width_mult: float = 1.0, num_classes: int = 1000, resolution: int = 224,
                       seed: int = 0, bn_batches: int = 2, batch: int = 4) -> nn.Module:
    """``arch`` with seeded random weights and BN running statistics from ``bn_batches`` random batches."""
    torch.manual_seed(seed)
    model = build_model(arch, width_mult=width_mult, num_classes=num_classes, resolution=resolution)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(bn_batches):
            model(torch.randn(batch, 3, resolution, resolution, generator=generator))
    return model.eval()


def random_int_model(model: nn.Module, *, resolution: int, config: QuantConfig | None = None, seed: int = 0,
                     calibration_batches: int = 2, batch: int = 4) -> IntModel:
    """Prepare ``model`` (w8a8 per-channel by default), calibrate on random batches, convert."""
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(1, 3, resolution, resolution, generator=generator)
    prepared = prepare(model, config or QuantConfig(act_observer="minmax"), example)
    with calibration_mode(prepared), torch.no_grad():
        for _ in range(calibration_batches):
            prepared(torch.randn(batch, 3, resolution, resolution, generator=generator))
    prepared.eval()
    return convert(prepared)
