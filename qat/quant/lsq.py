"""Learned step sizes: LSQ (Esser et al., ICLR 2020) and LSQ+ (Bhalgat et al., CVPR workshops 2020).

The quantizer's step size S (per tensor, or per output channel for weights) is an ``nn.Parameter`` trained by
gradient descent with the network (Esser eq. 1-3)::

    v̂ = (clamp(round(v/S) + Z, qmin, qmax) − Z) · S
    ∂v̂/∂S = (q − Z) − v/S  inside the grid,   (qmin − Z) or (qmax − Z)  where v was clipped   (Esser eq. 3)
    ∂v̂/∂v = 1 inside, 0 where clipped (the straight-through estimator)

and the gradient of S is scaled by g = 1/sqrt(N·Q_P) (Esser §2.2: N the number of values sharing that step size,
per sample for activations; Q_P the grid's positive extent). LSQ+ (``lsq_plus``, activations) also learns the
offset: a real zero point in code units whose rounded, clamped value Z is what the forward uses, so the simulated
model and the integer model share the same integer Z; its gradient is −S outside the grid and 0 inside (Bhalgat
eq. 4 in code units), scaled by the same g.

Initialisation during calibration (:func:`qat.quant.prepare.calibration_mode`), or on the first training batch
without calibration, by ``quant.step_init``: ``minmax`` (default; LSQ+ §3.3's min/max choice: the min/max
quantizer's S and Z over the calibration batches, per channel for weights), ``mse`` (LSQ+'s other choice,
Choukroun's search of :mod:`qat.quant.mse`), or ``lsq`` (Esser §2.1: S = 2·mean|v| / sqrt(Q_P), Z from the
observed range). Measured on the demo at W4A4 (MobileNet v2 0.35, calibrated, before fine-tuning): top-1 32.4%
(minmax), 26.1% (mse: per-channel MSE clipping of the folded weights hurt there, 26.1% with range observers too)
and 25.5% (lsq), against 34.6-36.9% for EMA activations with min/max weights. After the range-freeze
step of the schedule (``observing`` off) S and the offset stop learning. Under data parallelism the calibration
statistics combine across ranks (:mod:`qat.quant.range_sync`) and DDP averages the gradients, so every rank holds
the same S.

The forward is the CPU kernels' exact arithmetic (``x · float32(1/S)``, :mod:`qat.quant.vectorized`), so a step
size converts to the same integer model as a range-based one with that S.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qat.errors import QatError
from qat.quant import range_sync
from qat.quant.fake_quant import FakeQuantize
from qat.quant.mse import MseObserver
from qat.quant.observers import MinMaxObserver, Observer, channel_rows, reduce_dims
from qat.quant.scheme import QuantSpec, choose_qparams
from qat.quant.state import store
from qat.quant.vectorized import channel_shape

LSQ_NAMES = ("lsq", "lsq_plus")
STEP_INITS = ("mse", "minmax", "lsq")
STEP_DOMAINS = ("linear", "log")
MIN_STEP = 1e-8  # the step size's floor (choose_qparams' eps): a step trained to <= 0 stops at it


def positive_extent(spec: QuantSpec) -> int:
    """Q_P of Esser §2.2: qmax for a signed grid (symmetric weights), qmax − qmin for an unsigned one."""
    return spec.qmax if spec.signed else spec.qmax - spec.qmin


class LearnedStepFunction(torch.autograd.Function):
    """v̂ with LSQ's gradients for x, S and (LSQ+) the offset; ``shape`` broadcasts S and Z against x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int,
                grad_scale: float, shape: tuple[int, ...]) -> torch.Tensor:
        step = scale.clamp(min=MIN_STEP).reshape(shape)
        z = offset.detach().round().clamp(qmin, qmax).reshape(shape)
        inverse_times_x = torch.mul(x, torch.reciprocal(step))
        codes = torch.round(inverse_times_x).add_(z)
        clamped = torch.clamp(codes, qmin, qmax)
        mask = codes.eq_(clamped)  # 1.0 inside the grid
        centred = clamped.sub_(z)  # q − Z
        out = centred * step
        # ∂v̂/∂S per element: (q − Z) − v/S inside, (q − Z) where clipped
        slope = centred.sub_(inverse_times_x.mul_(mask))
        ctx.save_for_backward(mask, slope, step, scale)
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        mask, slope, step, scale = ctx.saved_tensors
        grad_x = grad * mask if ctx.needs_input_grad[0] else None
        grad_scale = grad_offset = None
        if ctx.needs_input_grad[1]:
            total = (grad * slope).sum_to_size(step.shape).reshape(scale.shape)
            grad_scale = total.mul_(ctx.grad_scale)  # also below the floor, so that a step pushed there recovers
        if ctx.needs_input_grad[2]:
            clipped = (grad * (1.0 - mask)).sum_to_size(step.shape)
            grad_offset = clipped.mul_(step).neg_().mul_(ctx.grad_scale).reshape(scale.shape)
        return grad_x, grad_scale, grad_offset, None, None, None, None


class LsqObserver(Observer):
    """Initialisation statistics of Esser's formula: the range (min/max over what it saw) and mean|v| (mean over
    batches; per channel for weights)."""

    sync = "extremes"

    def __init__(self, per_channel: bool = False, ch_axis: int = 0) -> None:
        super().__init__(per_channel, ch_axis)
        self.register_buffer("abs_mean", torch.tensor([]))
        self.register_buffer("batches", torch.tensor(0, dtype=torch.int64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        if prefix + "abs_mean" in state_dict:
            self.abs_mean = torch.empty_like(state_dict[prefix + "abs_mean"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def batch_abs_mean(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        if not self.per_channel:
            return x.abs().mean()
        rows = channel_rows(x, self.ch_axis)
        if rows is not None:
            return rows.abs().mean(1)
        return x.abs().mean(dim=reduce_dims(x, True, self.ch_axis))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.observed_range(x)
        stat = self.batch_abs_mean(x)
        if range_sync.active():
            stat, _ = range_sync.combine(stat, stat, "mean")
        if self.initialized:
            low, high = torch.minimum(low, self.min_val), torch.maximum(high, self.max_val)
            n = float(self.batches)
            stat = (self.abs_mean * n + stat) / (n + 1)
        self.min_val, self.max_val, self.abs_mean = low, high, stat
        self.batches += 1
        return x


class LearnedStepQuantize(FakeQuantize):
    """A fake quantizer whose step size S (and, LSQ+, offset) are learned (module docstring). The parameters are
    ``step`` and ``offset``; ``scale`` is the step in use (floored at :data:`MIN_STEP`) and ``zero_point`` the
    integer Z in use, so conversion reads them like any quantizer's;
    ``lr_scale`` multiplies the learning rate of its parameters (``quant.step_lr_scale``, no weight decay)."""

    def __init__(self, spec: QuantSpec, name: str, *, weights: bool = False, lr_scale: float = 1.0,
                 init: str = "minmax", domain: str = "linear") -> None:
        if name not in LSQ_NAMES:
            raise QatError("quant.act_observer", f"unknown learned-step quantizer {name!r}", "use lsq or lsq_plus")
        if init not in STEP_INITS:
            raise QatError("quant.step_init", f"unknown value {init!r}", f"valid choices: {', '.join(STEP_INITS)}")
        if domain not in STEP_DOMAINS:
            raise QatError("quant.step_domain", f"unknown value {domain!r}",
                           f"valid choices: {', '.join(STEP_DOMAINS)}")
        if weights and (name == "lsq_plus" or not spec.symmetric):
            raise QatError("quant.weight_observer", f"{name} for weights needs a symmetric weight grid and learns no "
                           "offset", "use quant.weight_observer=lsq with quant.weight_symmetric=true")
        observer: Observer
        if init == "lsq":
            observer = LsqObserver(spec.per_channel, spec.ch_axis)
        elif init == "mse":
            observer = MseObserver(spec, per_channel=spec.per_channel, ch_axis=spec.ch_axis, running=not weights)
        else:
            observer = MinMaxObserver(spec.per_channel, spec.ch_axis)
        super().__init__(spec, observer, observe_in_eval=weights)
        self.config_name, self.init, self.domain = name, init, domain
        del self._buffers["scale"]
        self.step = nn.Parameter(torch.ones(1))
        self.offset = nn.Parameter(torch.zeros(1), requires_grad=name == "lsq_plus")
        self.learns_offset = name == "lsq_plus"
        self.lr_scale = lr_scale

    def extra_repr(self) -> str:
        return f"{self.config_name}, init={self.init}, domain={self.domain}, {super().extra_repr()}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name in ("step", "offset"):  # per-channel shapes are known only after initialisation
            if prefix + name in state_dict:
                getattr(self, name).data = torch.empty_like(state_dict[prefix + name])
        if prefix + "zero_point" in state_dict:
            self.zero_point = torch.empty_like(state_dict[prefix + "zero_point"])
        super(FakeQuantize, self)._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # not its scale buffer

    def learned_step(self) -> torch.Tensor:
        """S as a function of the parameter ``step``: S itself (``linear``), or exp(step) (``log``: the parameter
        is ln S, as TQT (Jain et al. 2020 §3.3) trains log thresholds and Brevitas its LOG_FP scales; S stays
        positive and a gradient step changes it by a ratio, so a layer whose folded weights are tiny cannot
        overshoot its step size past zero)."""
        return self.step.exp() if self.domain == "log" else self.step

    @property
    def scale(self) -> torch.Tensor:  # type: ignore[override]
        """The step size in use: the learned step, floored at :data:`MIN_STEP` as the forward floors it."""
        return self.learned_step().clamp(min=MIN_STEP)

    def update_qparams(self) -> None:
        """S is learned, not derived from a range: only Z follows the offset."""
        with torch.no_grad():
            zero_point = self.offset.detach().round().clamp(self.spec.qmin, self.spec.qmax)
            store(self, "zero_point", zero_point.to(torch.int32))

    def initialize(self) -> None:
        """S and the offset from the observer's statistics (``quant.step_init``; Esser §2.1; Bhalgat §3.3)."""
        obs, spec = self.observer, self.spec
        with torch.no_grad():
            scale, zero_point = choose_qparams(obs.min_val, obs.max_val, spec)
            if isinstance(obs, LsqObserver):
                scale = (2.0 * obs.abs_mean / math.sqrt(positive_extent(spec))).clamp(min=MIN_STEP)
            # in place: the Parameter objects stay those the optimizer (built after calibration) holds
            step = scale.reshape(-1).float().clone()
            self.step.data = step.clamp(min=MIN_STEP).log() if self.domain == "log" else step
            self.offset.data = zero_point.reshape(-1).float().clone().to(self.step.device)
            self.update_qparams()

    def grad_scale(self, x: torch.Tensor) -> float:
        """g = 1/sqrt(N·Q_P) (Esser §2.2): N values per step size, per sample for activations."""
        if self.observe_in_eval:  # weights
            n = x.numel() // (x.shape[self.spec.ch_axis] if self.spec.per_channel else 1)
        else:
            n = x.numel() // max(1, x.shape[0])
        return 1.0 / math.sqrt(max(1, n) * positive_extent(self.spec))

    def forward(self, x: torch.Tensor, observe: bool = True) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        learning = self.observing and (self.training or self.observe_in_eval)
        if learning and observe and (self.calibrating or not self.observer.initialized):
            self.observer(x)
            self.initialize()
        if not self.quantizing or not self.observer.initialized:
            return x
        scale, offset = (self.learned_step(), self.offset) if learning else (self.scale.detach(),
                                                                             self.offset.detach())
        shape = channel_shape(x, self.spec.ch_axis) if self.spec.per_channel else ()
        if not self.spec.per_channel:
            scale, offset = scale.reshape(()), offset.reshape(())
        if self.learns_offset:
            self.update_qparams()  # Z as the forward uses it, for conversion and the integer bias
        return LearnedStepFunction.apply(x, scale, offset, self.spec.qmin, self.spec.qmax, self.grad_scale(x), shape)


def step_parameters(model: nn.Module) -> list[tuple[nn.Parameter, float]]:
    """Every learned step size and offset of ``model`` with its learning-rate multiplier."""
    found: list[tuple[nn.Parameter, float]] = []
    for module in model.modules():
        if isinstance(module, LearnedStepQuantize):
            found += [(p, module.lr_scale) for p in (module.step, module.offset) if p.requires_grad]
    return found


__all__ = ["LSQ_NAMES", "STEP_INITS", "LearnedStepFunction", "LearnedStepQuantize", "LsqObserver", "positive_extent",
           "step_parameters"]
