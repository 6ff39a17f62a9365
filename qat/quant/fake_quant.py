"""Simulated-quantization node: an observer plus the fused fake-quantize op (Jacob §3, Fig. 1.1b).

Activation ranges are updated only in training mode (``model.train()``); PTQ calibration puts just these
nodes in training mode (:func:`qat.quant.prepare.calibration_mode`). Two switches drive the schedule
(:mod:`qat.quant.schedule`): ``observing`` (ranges still being estimated; off after the range-freeze step)
and ``quantizing`` (off before the quantization delay, Jacob §3.1).

Per-tensor EMA quantizers (the activation default) take the fewer-kernel path of :mod:`qat.quant.fused`,
which gives the same numbers as the generic path below; on the CPU both fake-quantize with vectorized ops of the
same arithmetic (:mod:`qat.quant.vectorized`). ``QAT_UNFUSED_FAKE_QUANT=1`` forces the generic path on torch's
own fake-quantize kernels, the reference the others are tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.quant import fused
from qat.quant.observers import Observer
from qat.quant.scheme import QuantSpec, choose_qparams, fake_quantize
from qat.quant.state import store_qparams


class FakeQuantize(nn.Module):
    """x -> S·(clamp(round(x/S) + Z) - Z), with (S, Z) from the observer's range."""

    def __init__(self, spec: QuantSpec, observer: Observer, observe_in_eval: bool = False) -> None:
        super().__init__()
        self.observe_in_eval = observe_in_eval  # weights: their range follows the tensor in any mode
        self.spec = spec
        self.observer = observer
        self.observing = True
        self.quantizing = True
        self.calibrating = False  # inside qat.quant.prepare.calibration_mode (learned step sizes initialise)
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

    def extra_repr(self) -> str:
        s = self.spec
        grain = f"per_channel(axis={s.ch_axis})" if s.per_channel else "per_tensor"
        kind = "symmetric" if s.symmetric else "asymmetric"
        return (f"bits={s.bits}, [{s.qmin}, {s.qmax}], {kind}, {grain}, "
                f"observing={self.observing}, quantizing={self.quantizing}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name in ("scale", "zero_point"):  # per-channel shapes are known only after observing
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def update_qparams(self) -> None:
        """Recompute (S, Z) from the observer's current range."""
        if self.observer.initialized:
            store_qparams(self, *choose_qparams(self.observer.min_val, self.observer.max_val, self.spec))

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):  # mixed precision: ranges and grids stay in float32
            x = x.float()
        observe = self.observing and observe and (self.training or self.observe_in_eval)
        if fused.applies(self, x):
            return fused.ema_fake_quantize(self, x, observe)
        if observe:
            self.observer(x)
            self.update_qparams()
        if not self.quantizing or not self.observer.initialized:
            return x
        fast = fused.quantize_observed(self, x, observe)
        if fast is not None:
            return fast
        return fake_quantize(x, self.scale.to(x.device), self.zero_point.to(x.device), self.spec)


def fold_and_quantize(quantizer: nn.Module, w: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
    """``quantizer(w · factor)`` for a weight and a factor per output channel (the batch-norm fold of Jacob eq. 14;
    ``None``: no fold). For a :class:`FakeQuantize` with a current min/max per-channel observer on the CPU, the
    multiply, the range, (S, Z) and the fake quantizer are one kernel call
    (:func:`qat.quant.fused.fold_observe_quantize`); any other quantizer (learned steps, AdaQuant's) is called."""
    if type(quantizer) is FakeQuantize:
        fast = fused.fold_observe_quantize(quantizer, w, factor)
        if fast is not None:
            return fast
    return quantizer(w if factor is None else w * factor.reshape(-1, *[1] * (w.dim() - 1)))
