"""Bias correction (Nagel et al. 2019 §4.2, empirical form; Banner et al. 2019; used by Hubara et al. 2020
§4 as "bias tuning"): quantization biases each output channel's mean, E[y_q] ≠ E[y]. Layer by layer in
execution order, the per-channel mean of the pre-activation error between the float layer on float inputs and
the quantized layer on quantized inputs (from the already-corrected layers) is added to the layer's bias.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from qat.ptq.layers import (
    QuantLayer,
    bias_parameter,
    capture,
    float_reference,
    freeze_weight_ranges,
    preactivation,
    quantized_layers,
)


@torch.no_grad()
def _channel_mean(layer: QuantLayer, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    total, count = None, 0
    for chunk in x.split(batch_size):
        y = preactivation(layer, chunk).double()
        y = y.movedim(1, -1).reshape(-1, y.shape[1]) if y.dim() > 2 else y.reshape(-1, y.shape[-1])
        total = y.sum(0) if total is None else total + y.sum(0)
        count += y.shape[0]
    assert total is not None
    return (total / count).float()


@torch.no_grad()
def run_bias_correction(model: nn.Module, images: torch.Tensor,
                        reference: nn.Module | None = None) -> dict[str, object]:
    """Correct every quantized layer's bias of a calibrated ``model`` in place; ``reference`` is the float
    network (default: a copy of ``model`` with quantization off, taken now)."""
    started = time.time()
    reference = reference if reference is not None else float_reference(model)
    freeze_weight_ranges(model)
    shifts: dict[str, float] = {}
    for name, layer in quantized_layers(model):
        layer.eval()
        target = _channel_mean(reference.get_submodule(name), capture(reference, name, images))
        actual = _channel_mean(layer, capture(model, name, images))
        delta = target - actual
        # ``actual`` saw the bias rounded to its int32 grid (S_in·S_w); correct the float bias by that rounding
        # too, so the corrected bias rounds to within half a grid step of the target mean
        _, folded_bias = layer.folded_weight_and_bias()
        rounded = layer.quantized_bias(folded_bias, layer.weight_fq)
        delta = delta + (rounded - folded_bias).float()
        bias = bias_parameter(layer)
        bias.add_(delta.to(bias.dtype))
        shifts[name] = float(delta.abs().mean())
    model.eval()
    return {"layers": len(shifts), "mean_abs_shift": shifts, "images": int(images.shape[0]),
            "time_s": time.time() - started}
