"""Average pooling in the simulation, rounded exactly as the integer model rounds it (Jacob §2.4).

Average pooling keeps its input's grid, so the simulation re-rounds the pooled mean onto that grid. Rounding the
float mean with the fake quantizer breaks exact ties by float32 round-off (a 2×2 window's mean is a tie for a
quarter of all values), and a squeeze-excite gate carries each 1-LSB difference into the logits. This module
pools the input's own codes with the integer model's arithmetic (:func:`qat.intmodel.pooling.average_pool_centred`)
in the forward pass; the gradient is the float average pool's (straight-through on the rounding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qat.intmodel.pooling import average_pool_centred, float_average_pool
from qat.quant.fake_quant import FakeQuantize


class GridAveragePool(nn.Module):
    """Average pool whose output lies on its input quantizer's grid with the integer model's rounding.

    ``attrs`` are the integer model's ``avg_pool`` attributes; the input quantizer is bound by
    :meth:`bind_input_quantizer` (a reference, not a submodule). While that quantizer does not fake-quantize
    (before the quantization delay, during calibration) the pool is the float op."""

    def __init__(self, attrs: dict[str, Any]) -> None:
        super().__init__()
        self.attrs = dict(attrs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.attrs.items())

    def bind_input_quantizer(self, fq: FakeQuantize) -> None:
        object.__setattr__(self, "_input_fq", fq)  # a reference, not a submodule: no duplicate state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = float_average_pool(x, self.attrs)
        fq: FakeQuantize | None = getattr(self, "_input_fq", None)
        if fq is None or not (fq.quantizing and fq.observer.initialized):
            return pooled
        scale = fq.scale.detach().to(x.device).reshape(()).float()
        largest = fq.spec.qmax - fq.spec.qmin  # bounds |q - Z| for any Z of the grid (no read of Z: no graph break)
        with torch.no_grad():
            centred = torch.round(x.detach().float() / scale)  # x lies on the grid: exact codes q - Z
            exact = average_pool_centred(centred, self.attrs, largest).to(torch.float32) * scale
        return pooled + (exact.to(pooled.dtype) - pooled).detach()


__all__ = ["GridAveragePool"]
