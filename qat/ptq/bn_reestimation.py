"""Batch-norm re-estimation of the quantized network (Hubara et al. 2020 §4.2, "batch-norm tuning").

Quantization shifts and widens the pre-BN activations, so the running statistics learned by the float
network no longer normalize them. With BN folded into the convolution (QConvBnAct, Jacob eq. 14) the
pre-BN activation of the quantized layer is z = conv(x_q, Q(w·γ/σ))·σ/γ + b. Layer by layer in execution
order (each layer sees inputs from the already re-estimated layers before it), the running mean and variance
become the statistics of z over the calibration images, and the weights are re-folded with the new σ'. On a
per-channel grid Q(c·w) = c·Q(w), so the weight step is rescaled by σ/σ' and the quantized weights keep
their integers: the layer now outputs γ(z - μ')/σ' + β exactly.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from qat.ptq.layers import capture, freeze_weight_ranges, quantized_layers
from qat.ptq.two_tensor import TwoTensorWeightQuantizer
from qat.quant.fake_quant import FakeQuantize
from qat.quant.modules import QConvBnAct


@torch.no_grad()
def _pre_bn_moments(layer: QConvBnAct, x_q: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel of the quantized layer's pre-BN activation z."""
    bn = layer.bn
    assert bn is not None
    total = total_sq = None
    count = 0
    if layer.bn_fold == "unfolded":
        unscale = torch.ones_like(bn.running_var)
        w_q = layer.weight_fq(layer.conv.weight)
    else:
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
        unscale = torch.sqrt(bn.running_var + bn.eps) / gamma
        w_q = layer.weight_fq(layer.folded_weight_and_bias()[0])
    conv_bias = layer.conv.bias if layer.conv.bias is not None else torch.zeros_like(bn.running_mean)
    for chunk in x_q.split(batch_size):
        z = layer._conv(chunk, w_q) * unscale.reshape(1, -1, 1, 1) + conv_bias.reshape(1, -1, 1, 1)
        z = z.double()
        s, s2 = z.sum(dim=(0, 2, 3)), z.square().sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = s2 if total_sq is None else total_sq + s2
        count += z.numel() // z.shape[1]
    assert total is not None and total_sq is not None
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0) * count / max(count - 1, 1)
    return mean.float(), var.float()


@torch.no_grad()
def rescale_weight_steps(layer: QConvBnAct, factor: torch.Tensor, new_folded: torch.Tensor) -> None:
    """Follow a per-channel weight rescaling w -> factor·w in the layer's weight quantizer."""
    fq = layer.weight_fq
    if isinstance(fq, TwoTensorWeightQuantizer):
        fq.rescale_(factor)
    elif isinstance(fq, FakeQuantize) and fq.spec.per_channel:
        fq.scale = fq.scale * factor.reshape(fq.scale.shape).to(fq.scale.dtype)
    elif isinstance(fq, FakeQuantize):  # one step for all channels: re-derive it from the new weights
        fq.observer(new_folded)
        fq.update_qparams()


@torch.no_grad()
def reestimate_layer(layer: QConvBnAct, x_q: torch.Tensor) -> int:
    """Re-estimate one layer's BN statistics from its quantized input; return the channels updated."""
    bn = layer.bn
    assert bn is not None
    mean, var = _pre_bn_moments(layer, x_q)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
    ok = gamma.abs() > 1e-8  # a channel with γ≈0 carries no information about z
    old_std = torch.sqrt(bn.running_var + bn.eps)
    bn.running_mean.copy_(torch.where(ok, mean, bn.running_mean))
    bn.running_var.copy_(torch.where(ok, var, bn.running_var))
    if layer.bn_fold != "unfolded":
        factor = old_std / torch.sqrt(bn.running_var + bn.eps)
        rescale_weight_steps(layer, factor, layer.folded_weight_and_bias()[0])
    return int(ok.sum())


def run_bn_reestimation(model: nn.Module, images: torch.Tensor) -> dict[str, object]:
    """Re-estimate the BN statistics of every folded conv of a calibrated ``model``, in execution order."""
    started = time.time()
    freeze_weight_ranges(model)
    layers: dict[str, int] = {}
    for name, layer in quantized_layers(model):
        if isinstance(layer, QConvBnAct) and layer.bn is not None:
            layers[name] = reestimate_layer(layer, capture(model, name, images))
    model.eval()
    return {"layers": len(layers), "channels": sum(layers.values()), "images": int(images.shape[0]),
            "time_s": time.time() - started}
