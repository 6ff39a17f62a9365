"""Sequential AdaQuant (Hubara et al. 2020 §3, eq. 2-3; the "sequential" variant of §3/Fig. 2).

Layer by layer in execution order, on a small calibration set: the layer's weights, its bias and its weight
step sizes (a learnable per-channel factor on the calibrated step, straight-through rounding as in LSQ) are
optimized with Adam to minimize ||f_q(X_q) - f(X)||², the MSE between the quantized layer applied to the
*quantized* input X_q (from the already-optimized preceding layers) and the float layer's output on the float
input X. A layer whose calibration MSE does not improve keeps its previous parameters.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from qat.ptq.layers import (
    QuantLayer,
    bias_parameter,
    capture,
    float_reference,
    freeze_weight_ranges,
    quantized_layers,
    weight_of,
)
from qat.quant.fake_quant import FakeQuantize
from qat.quant.scheme import QuantSpec


def _per_channel_view(p: torch.Tensor, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if not spec.per_channel:
        return p.reshape(())
    shape = [1] * w.dim()
    shape[spec.ch_axis] = -1
    return p.reshape(shape)


class CalibratedRange:
    """The "observer" of a quantizer whose range is fixed by calibration: initialized, observes nothing."""

    initialized = True


class LearnableWeightQuantizer(nn.Module):
    """Fake-quantizer with step size S = S_0 · |a| (``a`` learnable, 1 at start) and rounding through the
    straight-through estimator, so the loss reaches both the weights and the step (LSQ-style)."""

    quantizing = True  # always on; the range is the calibrated one (read by the simulated int32 bias)
    observing = False

    def __init__(self, fq: FakeQuantize) -> None:
        super().__init__()
        self.spec = fq.spec
        self.register_buffer("base_scale", fq.scale.detach().clone().float())
        self.register_buffer("zero_point", fq.zero_point.detach().clone().float())
        self.factor = nn.Parameter(torch.ones_like(self.base_scale))
        self.observer = CalibratedRange()

    @property
    def scale(self) -> torch.Tensor:
        """S = S_0 · |a|; also the weight scale of the simulated int32 bias S_in·S_w (Jacob §2.4)."""
        return self.base_scale * self.factor.abs().clamp_min(1e-3)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = _per_channel_view(self.scale, w, self.spec)
        z = _per_channel_view(self.zero_point, w, self.spec)
        x = w / s + z
        q = (x + (torch.round(x) - x).detach()).clamp(self.spec.qmin, self.spec.qmax)
        return (q - z) * s


def _mse(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    with torch.no_grad():
        pairs = zip(x.split(batch_size), y.split(batch_size), strict=True)
        total = sum(F.mse_loss(layer(a), b, reduction="sum").item() for a, b in pairs)
    return total / y.numel()


def adaquant_layer(layer: QuantLayer, x_q: torch.Tensor, y_float: torch.Tensor, *, iterations: int,
                   batch_size: int, lr_weight: float, lr_bias: float, lr_scale: float,
                   generator: torch.Generator) -> dict[str, float]:
    """Optimize one layer in place (eval mode: BN folded with its running statistics); return its MSE."""
    fq = layer.weight_fq
    if not isinstance(fq, FakeQuantize):
        raise TypeError("adaquant_layer needs a FakeQuantize weight quantizer")
    layer.eval()
    weight, bias = weight_of(layer), bias_parameter(layer)
    saved = (weight.detach().clone(), bias.detach().clone())
    before = _mse(layer, x_q, y_float, 256)
    learnable = LearnableWeightQuantizer(fq).to(weight.device)
    layer.weight_fq = learnable
    optimizer = torch.optim.Adam([{"params": [weight], "lr": lr_weight}, {"params": [bias], "lr": lr_bias},
                                  {"params": [learnable.factor], "lr": lr_scale}])
    params = [weight, bias, learnable.factor]
    flags = [p.requires_grad for p in (weight, bias)]
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    n = x_q.shape[0]
    try:
        with torch.enable_grad():
            for _ in range(iterations):
                idx = torch.randint(n, (min(batch_size, n),), generator=generator)
                loss = F.mse_loss(layer(x_q[idx]), y_float[idx])
                optimizer.zero_grad(set_to_none=True)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                optimizer.step()
    finally:
        layer.weight_fq = fq
        weight.requires_grad_(flags[0])
        bias.requires_grad_(flags[1])
        weight.grad = bias.grad = None
    old_scale = fq.scale.clone()
    with torch.no_grad():
        fq.scale = learnable.scale.detach().to(fq.scale.dtype).reshape(fq.scale.shape)
    after = _mse(layer, x_q, y_float, 256)
    if not after < before:  # keep what was there
        with torch.no_grad():
            weight.copy_(saved[0])
            bias.copy_(saved[1])
        fq.scale = old_scale
        after = before
    return {"mse_before": before, "mse_after": after}


def run_adaquant(model: nn.Module, images: torch.Tensor, *, iterations: int = 100, batch_size: int = 32,
                 lr_weight: float = 1e-5, lr_bias: float = 1e-3, lr_scale: float = 1e-3, seed: int = 0,
                 reference: nn.Module | None = None) -> dict[str, object]:
    """Sequential AdaQuant over every quantized layer of a calibrated ``model`` (in place).

    ``reference`` is the float network (default: a copy of ``model`` with quantization off, taken now).
    Layers with a two-tensor weight quantizer are left as they are.
    """
    started = time.time()
    reference = reference if reference is not None else float_reference(model)
    freeze_weight_ranges(model)
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for name, layer in quantized_layers(model):
        if not isinstance(layer.weight_fq, FakeQuantize):
            skipped.append(name)
            continue
        x_q = capture(model, name, images)
        y_float = capture(reference, name, images, output=True)
        layers[name] = adaquant_layer(layer, x_q, y_float, iterations=iterations, batch_size=batch_size,
                                      lr_weight=lr_weight, lr_bias=lr_bias, lr_scale=lr_scale,
                                      generator=generator)
    model.eval()
    return {"layers": layers, "skipped_two_tensor": skipped, "images": int(images.shape[0]),
            "iterations": iterations, "time_s": time.time() - started}
