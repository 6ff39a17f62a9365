"""PTQ range calibration: min/max, percentile (whitepaper §3.1) or MSE-optimal clipping (Choukroun et al.
2019 §3.1: per-channel weight clipping and per-tensor activation clipping, both minimizing ||x - Q(x)||²).

Weights get their ranges once from the folded weights (MSE: exact to 1% of the range per channel, min/max
otherwise); activations are observed over the calibration images with the model in eval mode. All ranges are
frozen afterwards, so later methods (AdaQuant, BN re-estimation) own the step sizes.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from qat.errors import choice_error
from qat.ptq.config import CALIBRATION_OBSERVERS
from qat.ptq.layers import batches, freeze_weight_ranges, quantized_layers
from qat.quant.fake_quant import FakeQuantize
from qat.quant.observers import make_observer
from qat.quant.prepare import calibration_mode


def activation_quantizers(model: nn.Module) -> list[FakeQuantize]:
    """Every fake-quantizer that is not some layer's weight quantizer (one per quantized activation)."""
    weight_ids = {id(layer.weight_fq) for _, layer in quantized_layers(model)}
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, FakeQuantize) and id(m) not in weight_ids and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def set_observers(model: nn.Module, observer: str, percentile: float = 99.99) -> None:
    """Swap in fresh range observers: ``observer`` for activations; MSE per channel for weights when
    ``observer`` is ``mse``, current min/max otherwise (percentile clipping is an activation method)."""
    if observer not in CALIBRATION_OBSERVERS:
        raise choice_error("ptq.calibration_observer", observer, CALIBRATION_OBSERVERS)
    weight_name = "mse" if observer == "mse" else "current"
    for _, layer in quantized_layers(model):
        fq = layer.weight_fq
        if isinstance(fq, FakeQuantize):
            spec = fq.spec
            fq.observer = make_observer(weight_name, per_channel=spec.per_channel, ch_axis=spec.ch_axis,
                                        key="ptq.calibration_observer", spec=spec, weights=True)
            fq.observing = True
    for fq in activation_quantizers(model):
        fq.observer = make_observer(observer, per_channel=False, ch_axis=0, key="ptq.calibration_observer",
                                    spec=fq.spec, percentile=percentile)
        fq.observing = True
    config = getattr(model, "qat_config", None)
    if config is not None:
        model.qat_config = replace(config, act_observer=observer, weight_observer=weight_name)


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor, observer: str = "minmax", percentile: float = 99.99,
              batch_size: int = 64) -> dict[str, object]:
    """Set every range of ``model`` from ``images`` with ``observer`` and freeze them; return a summary."""
    set_observers(model, observer, percentile)
    freeze_weight_ranges(model)
    with calibration_mode(model):
        for chunk in batches(images, batch_size):
            model(chunk)
    acts = activation_quantizers(model)
    for fq in acts:
        fq.observing = False
    model.eval()
    return {"observer": observer, "images": int(images.shape[0]), "activation_quantizers": len(acts),
            "weight_quantizers": len(quantized_layers(model))}
