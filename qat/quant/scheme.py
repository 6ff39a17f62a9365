"""The affine quantization scheme r = S(q - Z) (Jacob et al. 2018 §2.1, eq. 1; whitepaper §2.1).

A :class:`QuantSpec` fixes the integer grid: bit width (2..16), signed or unsigned container, symmetric
(Z = 0 for signed grids) or asymmetric, narrow range for weights (int8 in [-127, 127], whitepaper §2.2),
per-tensor or per-channel along ``ch_axis``. Quantization parameters are chosen so that real 0.0 is exactly
representable (zero-point nudging, Jacob §2.1), which zero padding and ReLU rely on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qat.errors import QatError
from qat.quant import vectorized

MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid of one tensor.

    ``key`` names the config keys of the grid's fields in error messages: a template with ``{}`` for the field
    (``"quant.weight_{}"`` names ``quant.weight_bits``, ``quant.weight_ch_axis`` ...), or a prefix joined with
    a dot (``"quant"`` names ``quant.bits``).
    """

    bits: int = 8
    signed: bool = False
    symmetric: bool = False
    narrow_range: bool = False
    per_channel: bool = False
    ch_axis: int = 0
    key: str = "quant"

    def key_of(self, name: str) -> str:
        """The config key of field ``name`` (see ``key``)."""
        return self.key.format(name) if "{}" in self.key else f"{self.key}.{name}"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise QatError(self.key_of("bits"), f"{self.bits!r} is outside [{MIN_BITS}, {MAX_BITS}]",
                           "choose an integer bit width from 2 to 16")
        if self.symmetric and not self.signed:
            raise QatError(self.key_of("symmetric"), "a symmetric grid needs a signed container",
                           f"set {self.key_of('symmetric')}=false or build the grid with signed=True")

    @property
    def qmin(self) -> int:
        if self.signed:
            low = -(2 ** (self.bits - 1))
            return low + 1 if self.narrow_range else low
        return 1 if self.narrow_range else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def check_axis(self, x: torch.Tensor) -> None:
        """Raise a clear error when the per-channel axis is not an axis of ``x``."""
        if self.per_channel and not -x.dim() <= self.ch_axis < x.dim():
            raise QatError(self.key_of("ch_axis"), f"axis {self.ch_axis} does not exist in a {x.dim()}-d tensor",
                           f"choose an axis in [0, {x.dim() - 1}] or set {self.key_of('per_channel')}=false")


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec,
                   eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale S and integer zero point Z for a real range [min, max] (Jacob eq. 1, §2.1 nudging).

    The range is first widened to contain 0.0. Symmetric grids use S = max|r| / qmax-ish and Z = 0;
    asymmetric grids use S = (max - min) / (qmax - qmin) and Z = round(qmin - min / S), clamped, so that
    0.0 maps exactly to the integer Z.
    """
    min_val = torch.clamp(min_val.detach().float(), max=0.0)
    max_val = torch.clamp(max_val.detach().float(), min=0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        absmax = torch.maximum(-min_val, max_val)
        scale = absmax / ((qmax - qmin) / 2)
        scale = torch.clamp(scale, min=eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zero_point
    scale = torch.clamp((max_val - min_val) / float(qmax - qmin), min=eps)
    zero_point = torch.clamp(torch.round(qmin - min_val / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """q = clamp(round(r / S) + Z, qmin, qmax) as an integer tensor (int32 container)."""
    if spec.per_channel:
        spec.check_axis(x)
        scale, zero_point = _broadcast(scale, x, spec.ch_axis), _broadcast(zero_point, x, spec.ch_axis)
    q = torch.round(x / scale) + zero_point
    return torch.clamp(q, spec.qmin, spec.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """r = S (q - Z) (Jacob eq. 1)."""
    if spec.per_channel:
        scale, zero_point = _broadcast(scale, q, spec.ch_axis), _broadcast(zero_point, q, spec.ch_axis)
    return scale * (q.float() - zero_point.float())


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Simulated quantization dequantize(quantize(x)) with the straight-through estimator (Jacob §3, eq. 12).

    Uses torch's fused fake-quantize kernels: the gradient passes unchanged inside the clamp range and is zero
    outside it.
    """
    if spec.per_channel:
        spec.check_axis(x)
        if x.is_cuda or torch.compiler.is_compiling():  # torch's op syncs with the host (see vectorized)
            return vectorized.fake_quantize_without_sync(x, scale, zero_point.to(torch.int32), spec.qmin, spec.qmax,
                                                         spec.ch_axis)
        return torch.fake_quantize_per_channel_affine(
            x, scale.float(), zero_point.to(torch.int32), spec.ch_axis % x.dim(), spec.qmin, spec.qmax)
    return torch.fake_quantize_per_tensor_affine(
        x, scale.float().reshape(()), zero_point.to(torch.int32).reshape(()), spec.qmin, spec.qmax)
