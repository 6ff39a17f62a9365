"""Two-tensor weights for poorly quantized layers (Choukroun et al. 2019 §3.3, "multiple low-precision
tensors"): W ≈ Q1(W) + Q2(W - Q1(W)), the second tensor quantizing the residual on its own per-channel grid
(MSE-optimal range, same bit width). A layer gets it when its relative weight error ||W - Q1(W)||² / ||W||²
exceeds a threshold; the price is a second weight tensor and a second convolution (extra bits and MACs).

Simulation only: the canonical integer model has no two-tensor layer yet, so converting a model holding one
raises :class:`QatError` naming the layer (never silently dropping the residual).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from qat.errors import NoIntegerForm, QatError
from qat.ptq.layers import layer_macs, quantized_layers
from qat.quant.fake_quant import FakeQuantize
from qat.quant.mse import mse_optimal_range
from qat.quant.scheme import QuantSpec, choose_qparams, fake_quantize


class FixedRangeObserver:
    """Observer of a two-tensor quantizer: its range is fixed (``initialized``); integer conversion, which
    asks for more (e.g. ``observer.to(device)``), gets the not-convertible error naming the layer."""

    initialized = True

    def __init__(self, layer_name: str) -> None:
        self.layer_name = layer_name

    def __getattr__(self, name: str) -> object:
        raise not_convertible(self.layer_name)


class TwoTensorWeightQuantizer(nn.Module):
    """Drop-in weight quantizer of a QConvBnAct/QLinear: returns Q1(w) + Q2(w - Q1(w))."""

    def __init__(self, layer_name: str, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor,
                 residual_scale: torch.Tensor, residual_zero_point: torch.Tensor) -> None:
        super().__init__()
        self.layer_name = layer_name
        self.spec = spec
        self.quantizing = True
        self.observing = False  # ranges are fixed at creation; BN re-estimation rescales them
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())
        self.register_buffer("residual_scale", residual_scale.detach().clone())
        self.register_buffer("residual_zero_point", residual_zero_point.detach().clone())

    @property
    def observer(self) -> FixedRangeObserver:
        """Ranges are fixed (``initialized``, read by the simulated int32 bias); anything else that integer
        conversion asks of the observer raises: a two-tensor layer has no integer form."""
        return FixedRangeObserver(self.layer_name)

    def extra_repr(self) -> str:
        return f"layer={self.layer_name}, bits={self.spec.bits}+{self.spec.bits}, quantizing={self.quantizing}"

    def first(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale, self.zero_point, self.spec)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.quantizing:
            return w
        q1 = self.first(w)
        return q1 + fake_quantize(w - q1, self.residual_scale, self.residual_zero_point, self.spec)

    @torch.no_grad()
    def rescale_(self, factor: torch.Tensor) -> None:
        """Follow a per-output-channel rescaling of the weights (Q(c·w) = c·Q(w) on per-channel grids)."""
        self.scale.mul_(factor.reshape(self.scale.shape))
        self.residual_scale.mul_(factor.reshape(self.residual_scale.shape))


def not_convertible(layer_name: str) -> NoIntegerForm:
    return NoIntegerForm(f"convert.{layer_name}",
                         "is a two-tensor layer (Choukroun §3.3, W = Q1(W) + Q2(residual)); the integer model "
                         "has no two-tensor conv/linear yet and dropping the residual would change the network",
                         "evaluate it in simulation, or run PTQ with ptq.two_tensor_threshold=null to convert")


def check_convertible(model: nn.Module) -> None:
    """Raise the conversion error for the first two-tensor layer of ``model`` (call before convert())."""
    for name, layer in quantized_layers(model):
        if isinstance(layer.weight_fq, TwoTensorWeightQuantizer):
            raise not_convertible(name)


def relative_weight_error(w: torch.Tensor, q: torch.Tensor) -> float:
    """||W - Q(W)||² / ||W||² (Choukroun's per-layer quantization-error criterion)."""
    w, q = w.detach(), q.detach()
    return float((w - q).square().sum() / w.square().sum().clamp_min(1e-30))


@torch.no_grad()
def make_two_tensor(layer_name: str, fq: FakeQuantize, w: torch.Tensor) -> TwoTensorWeightQuantizer:
    """Two-tensor quantizer keeping ``fq``'s (calibrated) grid for Q1 and an MSE-optimal grid for Q2."""
    spec = fq.spec
    if not spec.per_channel:
        raise QatError("ptq.two_tensor_threshold", f"layer {layer_name} has per-tensor weights",
                       "two-tensor layers need per-channel weights (quant.weight_per_channel=true)")
    residual = w - fake_quantize(w, fq.scale, fq.zero_point, spec)
    rows = residual.movedim(spec.ch_axis, 0).flatten(1)
    low, high = mse_optimal_range(rows, replace(spec, per_channel=False))
    scale2, zp2 = choose_qparams(low, high, spec)
    return TwoTensorWeightQuantizer(layer_name, spec, fq.scale, fq.zero_point, scale2, zp2)


@torch.no_grad()
def apply_two_tensor(model: nn.Module, threshold: float, example: torch.Tensor) -> dict[str, object]:
    """Give every layer whose relative weight error exceeds ``threshold`` a two-tensor quantizer (its range
    must be calibrated first); return the chosen layers, their errors before/after and the extra cost."""
    macs = layer_macs(model, example)
    chosen: dict[str, dict[str, float]] = {}
    errors: dict[str, float] = {}
    extra_bits = extra_macs = 0
    total_bits = total_macs = 0
    for name, layer in quantized_layers(model):
        fq = layer.weight_fq
        w = layer.folded_weight_and_bias()[0]
        total_bits += w.numel() * fq.spec.bits
        total_macs += macs[name]
        if not isinstance(fq, FakeQuantize):
            continue
        error = relative_weight_error(w, fake_quantize(w, fq.scale, fq.zero_point, fq.spec))
        errors[name] = error
        if error <= threshold:
            continue
        two = make_two_tensor(name, fq, w)
        layer.weight_fq = two
        chosen[name] = {"relative_mse_before": error, "relative_mse_after": relative_weight_error(w, two(w)),
                        "extra_weight_bits": w.numel() * fq.spec.bits, "extra_macs": macs[name]}
        extra_bits += w.numel() * fq.spec.bits
        extra_macs += macs[name]
    return {"threshold": threshold, "layers": chosen, "relative_mse": errors,
            "extra_weight_bits": extra_bits, "extra_macs": extra_macs,
            "extra_weight_bits_fraction": extra_bits / max(total_bits, 1),
            "extra_macs_fraction": extra_macs / max(total_macs, 1)}
