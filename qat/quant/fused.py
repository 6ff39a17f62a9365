"""Fewer-kernel fake quantization for per-tensor EMA activation quantizers (Jacob §3.1 and eq. 12).

:class:`~qat.quant.fake_quant.FakeQuantize` with an :class:`~qat.quant.observers.EmaMinMaxObserver` runs, per
training step, the EMA range update ``m <- decay·m + (1 - decay)·batch`` (first batch sets the range),
:func:`qat.quant.scheme.choose_qparams` and the straight-through fake quantizer. Unfused, that is about 20
small kernels plus several Python module calls per quantizer; on a GPU the launches dominate. This module
computes the *same float32 results bit for bit* in 14 (asymmetric) or 11 (symmetric) ops and no module calls:

* the EMA for min and max is done by 3 ``torch._foreach_*`` ops on the pair instead of 6 ops;
* the symmetric ``max(-min(m, 0), max(M, 0))`` becomes ``max(-m, M)`` clamped at 0 (3 ops instead of 4);
* ``qmin - min/S`` is one ``addcdiv`` (``qmin + (-1)·min/S``: the negation is exact, one rounding each);
* the fake quantizer is called without the ``ones`` tensor the public op allocates on every call.

Every new value is written into the same buffers as on the unfused path (``observer.min_val``,
``observer.max_val``, ``scale``, ``zero_point``) by :func:`qat.quant.state.store`, so checkpoints, the schedule
flags, conversion and DDP see exactly what they saw before.

torch's private ``torch._fused_moving_avg_obs_fq_helper`` (torch.ao's ``FusedMovingAvgObsFakeQuantize``) would
do all of this in one call. It is deliberately
**not** called, because its semantics differ from ours: its EMA is ``m + c·(b - m)`` (a different float
rounding: ranges differ in the last bit on about half of the steps); its symmetric scale is
``max(|min|/128, max/127)`` for int8 (``max|r|/127.5`` here) and ignores the narrow range; its zero point
picks between ``qmin - min/S`` and ``qmax - max/S`` in double precision; a zero range gets S = 0.1 (and on CPU
a minimum scale of about 6e-5) instead of ``eps``; and its CPU and CUDA kernels differ from each other
(float vs double range). The private ops used instead are ``torch._foreach_mul``/``_foreach_add`` and
``torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams`` (the kernel and STE gradient behind
``torch.fake_quantize_per_tensor_affine``), taken from :mod:`qat.compat.torch_private`, the one module of qat
that touches torch's private API.

Set ``QAT_UNFUSED_FAKE_QUANT=1`` (or ``qat.quant.fused.ENABLED = False``, or use :func:`unfused_path`) to
force the unfused reference path, e.g. to compare the two.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from qat.compat.torch_private import fake_quantize_cachemask_tensor_qparams, foreach_add_, foreach_mul, foreach_mul_
from qat.errors import QatError
from qat.quant import cpu_kernel, range_sync, vectorized
from qat.quant.observers import CurrentMinMaxObserver, EmaMinMaxObserver, aminmax
from qat.quant.scheme import QuantSpec
from qat.quant.state import store_qparams, store_range

if TYPE_CHECKING:
    from qat.quant.fake_quant import FakeQuantize

ENV_VAR = "QAT_UNFUSED_FAKE_QUANT"
EPS = 1e-8  # the default eps of qat.quant.scheme.choose_qparams


def _enabled_from_env() -> bool:
    value = os.environ.get(ENV_VAR, "")
    if value not in ("", "0", "1"):
        raise QatError(ENV_VAR, f"{value!r} is not 0 or 1", f"set {ENV_VAR}=1 to force the unfused path, else unset it")
    return value != "1"


ENABLED: bool = _enabled_from_env()

_ONES: dict[torch.device, torch.Tensor] = {}  # the "fake quant enabled" flag of the cachemask op, per device
_QMIN: dict[tuple[torch.device, int], torch.Tensor] = {}  # qmin as a float32 0-d tensor, per device


@contextmanager
def unfused_path() -> Iterator[None]:
    """Run the block with the unfused reference path (for equality tests and benchmarks)."""
    global ENABLED
    saved, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = saved


def _constant(cache: dict, key: object, make) -> torch.Tensor:  # type: ignore[type-arg, no-untyped-def]
    if torch.compiler.is_compiling():  # a constant of the graph (a cache lookup would guard, then recompile)
        return make()
    value = cache.get(key)
    if value is None:
        with torch.inference_mode(False):  # a normal tensor even if first built under inference mode
            value = cache[key] = make()
    return value


def _on(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    return t.dtype == dtype and t.device == device


def applies(fq: FakeQuantize, x: torch.Tensor) -> bool:
    """Whether :func:`ema_fake_quantize` reproduces the unfused path for ``fq`` on ``x``.

    Needs a per-tensor EMA observer (exactly :class:`EmaMinMaxObserver`, not a subclass), a float32 input and
    the state in float32/int32 on the input's device (the reference path handles every other case).
    """
    obs = fq.observer
    if not ENABLED or type(obs) is not EmaMinMaxObserver or fq.spec.per_channel or obs.per_channel:
        return False
    device = x.device
    if x.dtype != torch.float32 or not _on(fq.scale, device, torch.float32):
        return False
    if not _on(fq.zero_point, device, torch.int32):
        return False
    low = obs.min_val
    return low.numel() == 0 or (low.dim() == 0 and _on(low, device, torch.float32)
                                and _on(obs.max_val, device, torch.float32))


def ema_update(obs: EmaMinMaxObserver, x: torch.Tensor) -> None:
    """Jacob §3.1: m <- decay·m + (1 - decay)·batch for min and max; the first batch sets the range. Under
    :func:`qat.quant.range_sync.synchronized` the batch is the global one (min of the ranks' minima, max of
    their maxima), as on the unfused path."""
    low, high = aminmax(x.detach())
    if range_sync.active():
        low, high = range_sync.combine(low, high, obs.sync)
    if obs.min_val.numel() == 0:
        store_range(obs, low, high)
        return
    batch = [low, high]
    foreach_mul_(batch, 1 - obs.decay)  # fresh tensors from aminmax: safe to scale in place
    running = foreach_mul([obs.min_val, obs.max_val], obs.decay)
    foreach_add_(running, batch)
    store_range(obs, *running)


def qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, Z) equal bit for bit to :func:`qat.quant.scheme.choose_qparams` on float32 0-d ranges."""
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:  # max(-min(m, 0), max(M, 0)) == max(max(-m, M), 0)
        absmax = torch.maximum(torch.neg(min_val), max_val).clamp_min_(0.0)
        scale = absmax.div_((qmax - qmin) / 2).clamp_min_(EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    low = torch.clamp(min_val, max=0.0)
    high = torch.clamp(max_val, min=0.0)
    scale = torch.sub(high, low).div_(float(qmax - qmin)).clamp_min_(EPS)
    qmin_t = _constant(_QMIN, (low.device, qmin), lambda: torch.tensor(float(qmin), device=low.device))
    zero_point = torch.addcdiv(qmin_t, low, scale, value=-1).round_().clamp_(qmin, qmax)
    return scale, zero_point.to(torch.int32)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """S·(clamp(round(x/S) + Z) - Z) with the STE gradient: the kernel of qat.quant.scheme.fake_quantize (on the
    CPU as vectorized ops with its exact arithmetic, :mod:`qat.quant.vectorized`)."""
    if vectorized.applies(x):
        return vectorized.fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax)
    ones = _constant(_ONES, x.device, lambda: torch.ones(1, dtype=torch.long, device=x.device))
    return fake_quantize_cachemask_tensor_qparams(x, scale, zero_point, ones, spec.qmin, spec.qmax)[0]


def quantize_observed(fq: FakeQuantize, x: torch.Tensor, observed: bool) -> torch.Tensor | None:
    """The generic path's fake quantizer for a float32 CPU ``x`` as vectorized ops (:mod:`qat.quant.vectorized`),
    equal to :func:`qat.quant.scheme.fake_quantize` bit for bit; a per-channel weight whose range was just
    observed on ``x`` skips clamp and mask when nothing can be clipped. ``None``: not applicable here."""
    if not ENABLED or not vectorized.applies(x):
        return None
    spec, obs = fq.spec, fq.observer
    scale, zero_point = fq.scale, fq.zero_point
    if scale.device != x.device or zero_point.device != x.device:
        return None
    if not spec.per_channel:
        return vectorized.fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax)
    spec.check_axis(x)
    if observed and type(obs) is CurrentMinMaxObserver and obs.per_channel and obs.ch_axis == spec.ch_axis:
        out = vectorized.fake_quantize_unclipped(x, scale, zero_point, obs.min_val, obs.max_val, spec.qmin,
                                                 spec.qmax, spec.ch_axis)
        if out is not None:
            return out
    return vectorized.fake_quantize(x, scale, zero_point, spec.qmin, spec.qmax, spec.ch_axis)


def fold_observe_quantize(fq: FakeQuantize, w: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor | None:
    """``fq(w · factor)`` (``factor`` per output channel, or None) for a per-output-channel weight quantizer with a
    current min/max observer, in one call of qat's C++ kernel (:func:`qat.quant.vectorized.fold_fake_quantize_weight`):
    the same range, (S, Z), output and gradients as the ops it replaces, stored into the same buffers. ``None``
    where it does not apply (the caller takes the generic path)."""
    obs, spec = fq.observer, fq.spec
    if not (ENABLED and w.dim() >= 1 and w.shape[0] > 0 and type(obs) is CurrentMinMaxObserver and obs.per_channel
            and spec.per_channel and spec.ch_axis % w.dim() == 0 and obs.ch_axis % w.dim() == 0 and fq.quantizing
            and fq.observing and (fq.training or fq.observe_in_eval) and vectorized.applies(w)
            and not range_sync.active() and cpu_kernel.ops() is not None):
        return None
    if not (w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last))):
        return None
    if factor is not None and not (factor.dtype == torch.float32 and factor.device == w.device
                                   and factor.numel() == w.shape[0]):
        return None
    out, low, high, scale, zero_point = vectorized.fold_fake_quantize_weight(
        w, factor, spec.qmin, spec.qmax, spec.symmetric, EPS)
    store_range(obs, low, high)
    store_qparams(fq, scale, zero_point)
    return out


def ema_fake_quantize(fq: FakeQuantize, x: torch.Tensor, observe: bool) -> torch.Tensor:
    """The body of FakeQuantize.forward for a float32 ``x`` when :func:`applies` holds."""
    obs = fq.observer
    if (observe and fq.quantizing and x.numel() > 0 and vectorized.applies(x) and not range_sync.active()
            and cpu_kernel.ops() is not None):  # all of it in one call of qat's kernel, the same numbers
        out, low, high, scale, zero_point = vectorized.ema_fake_quantize(
            x, obs.min_val, obs.max_val, obs.decay, fq.spec.qmin, fq.spec.qmax, fq.spec.symmetric, EPS)
        store_range(obs, low, high)
        store_qparams(fq, scale, zero_point)
        return out
    if observe:
        ema_update(obs, x)
        store_qparams(fq, *qparams(obs.min_val, obs.max_val, fq.spec))
    if not fq.quantizing or obs.min_val.numel() == 0:
        return x
    return fake_quantize(x, fq.scale, fq.zero_point, fq.spec)
