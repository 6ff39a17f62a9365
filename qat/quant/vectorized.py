"""Fake quantization on the CPU as a few vectorized ops, bit for bit what torch's fake-quantize kernels compute
(Jacob §3 eq. 12 with the straight-through estimator).

torch's CPU kernels behind ``torch.fake_quantize_per_{tensor,channel}_affine`` (the ``_cachemask`` variants, as
checked against torch 2.14.1) loop element by element without SIMD: about 3.6 ns (per tensor) and 6.5 ns (per
channel) per element on this project's CPUs, which made fake quantization a fifth of a QAT step
(``scripts/bench/qat_overhead.py``). Their arithmetic, per element, is::

    q    = Z + nearbyint(x · float32(1/S))          float32 (ties to even)
    out  = (clamp(q, qmin, qmax) − Z) · S           exact small integers times S, one rounding
    mask = qmin <= q <= qmax                        the STE: the gradient passes where nothing was clipped

Here the same float32 operations run as whole-tensor ATen ops (multiply, round, add, clamp, compare, subtract,
multiply), so every intermediate value and every rounding is the kernel's; the mask is kept as float 1.0/0.0 and
the backward is ``grad · mask``, as torch's ``grad · mask`` with a bool mask promotes it. Only NaN inputs differ
(torch clamps a NaN code to qmin, these ops keep NaN; a NaN loss stops training anyway, :mod:`qat.train.engine`),
and, per channel, codes beyond ±2^63 (infinities), which torch's kernel casts to int64 before clamping (undefined
in C++; on x86 they become qmin) and these ops clamp.

Where qat's fused C++ kernel is available (:mod:`qat.quant.cpu_kernel`, the default), both functions run it
instead: the same arithmetic per element in one pass, forward and backward, with the mask as bool.

:func:`fake_quantize_unclipped` is for a per-channel weight quantizer whose range was just taken from this very
tensor: when the codes of every channel's minimum and maximum lie inside [qmin, qmax] (checked on the C range
values with the same ops; rounding is monotone), no element is clipped, so the clamp and the mask are identities
and are not computed.
"""

from __future__ import annotations

from typing import Any

import torch

from qat.quant import cpu_kernel


def _shaped(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t.reshape(shape) if shape else t.reshape(())


class _FakeQuantize(torch.autograd.Function):
    """S·(clamp(round(x·(1/S)) + Z, qmin, qmax) − Z) with the STE mask, the CPU kernels' arithmetic."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                shape: tuple[int, ...], shifted: bool) -> torch.Tensor:
        z = _shaped(zero_point.to(torch.float32), shape)
        codes = torch.mul(x, _shaped(torch.reciprocal(scale), shape))
        codes.round_().add_(z)  # Z + nearbyint(x/S) (the +Z also turns -0.0 into +0.0, as the kernel's cast does)
        out = torch.clamp(codes, qmin, qmax)
        mask = codes.eq_(out)  # 1.0 where nothing was clipped, in place of the codes
        if shifted:  # Z is not all zero (or not known to be): out - 0 is out
            out.sub_(z)
        out.mul_(_shaped(scale, shape))
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None, None


class _Unclipped(torch.autograd.Function):
    """The same without clamp and mask, for a tensor whose codes provably lie inside the grid."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, inverse: torch.Tensor, z: torch.Tensor, scale: torch.Tensor,
                shifted: bool) -> torch.Tensor:
        codes = torch.mul(x, inverse)
        codes.round_().add_(z)
        if shifted:
            codes.sub_(z)
        return codes.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad, None, None, None, None  # the mask is all ones: grad · 1.0 is grad


class _FusedFakeQuantize(torch.autograd.Function):
    """The same in one pass of qat's C++ kernel (``axis`` -1: per tensor); ``need_mask`` False for a tensor
    whose codes provably lie inside the grid (the mask would be all ones, the backward the identity)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                axis: int, need_mask: bool) -> torch.Tensor:
        out, mask = cpu_kernel.ops().fake_quantize(x, scale, zero_point, qmin, qmax, axis, need_mask)
        ctx.need_mask = need_mask
        if need_mask:
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.need_mask:
            return grad, None, None, None, None, None, None
        (mask,) = ctx.saved_tensors
        return cpu_kernel.ops().fake_quantize_backward(grad, mask), None, None, None, None, None, None


def fold_fake_quantize_weight(w: torch.Tensor, factor: torch.Tensor | None, qmin: int, qmax: int, symmetric: bool,
                              eps: float) -> tuple[torch.Tensor, ...]:
    """``(fq(w'), min, max, S, Z)`` for ``w' = w · factor`` (per output channel; ``factor`` None: ``w`` itself)
    with (S, Z) per output channel from ``w'``'s own range (a weight quantizer's current min/max observer and
    :func:`qat.quant.scheme.choose_qparams`): the folded weight of Jacob eq. 14 / whitepaper Fig. 13 observed and
    fake-quantized (eq. 12) in one pass of qat's C++ kernel, bit for bit the ATen ops' results. Needs the kernel
    (:func:`qat.quant.cpu_kernel.ops`) and a weight whose output channels are contiguous blocks."""
    # autograd in C++ (qat_cpu.fold_fake_quantize_weight_train): the backward is autograd's for w · factor after the
    # STE mask, factor's gradient autograd's sum of (grad · w) over all but the output axis
    return cpu_kernel.ops().fold_fake_quantize_weight_train(w, factor, qmin, qmax, symmetric, eps)


class _BatchMoments(torch.autograd.Function):
    """(var, mean) of :func:`batch_moments` by qat's kernel; both outputs differentiable."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(y)
        return cpu_kernel.ops().batch_moments(y)

    @staticmethod
    def backward(ctx: Any, grad_var: torch.Tensor | None, grad_mean: torch.Tensor | None) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return cpu_kernel.ops().batch_moments_backward(grad_var, grad_mean, y)


def batch_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.var_mean(y, (0, 2, 3), unbiased=False)`` (the batch moments of Jacob eq. 14) for a 4-d float32 CPU
    tensor: in qat's C++ kernel where it is built and ``y`` is NCHW or NHWC (two passes in float64, ten times
    faster than torch's Welford reduction on NHWC; equal to its float32 results but where float64 error meets a
    float32 rounding boundary, then by one ulp; the backward is autograd's, element for element), else torch's."""
    if (cpu_kernel.ops() is not None and applies(y) and y.dim() == 4
            and (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last))):
        return _BatchMoments.apply(y)
    return torch.var_mean(y, dim=(0, 2, 3), unbiased=False)


def per_channel_kernel(y: torch.Tensor, *vectors: torch.Tensor | None) -> Any | None:
    """qat's kernel ops for a per-channel operation on ``y`` with ``vectors`` (one float32 value per channel each;
    ``None`` stands for an absent optional one), or ``None`` when they do not apply (no kernel, not a float32
    NCHW/NHWC CPU tensor, compiling)."""
    if not (applies(y) and y.dim() == 4 and (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last))
            and all(v is None or (v.dtype == torch.float32 and v.device == y.device and v.numel() == y.shape[1])
                    for v in vectors)):
        return None
    return cpu_kernel.ops()


ACTIVATION_CODES = {"relu": 1, "relu6": 2}


class ActivationHandoff:
    """What a layer's ReLU/ReLU6 output carries to the activation quantizer that is its only consumer
    (``tensor._qat_handoff``): the activation, and whether that quantizer's backward applied the activation's
    gradient mask too (then :class:`_HandedOffActivation` passes the gradient through; else it applies it)."""

    __slots__ = ("activation", "applied")

    def __init__(self, activation: str) -> None:
        self.activation = activation
        self.applied = False


class _HandedOffActivation(torch.autograd.Function):
    """ReLU/ReLU6 whose gradient mask the next quantizer may apply in its own pass (one pass fewer)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, handoff: ActivationHandoff) -> torch.Tensor:
        # in place, as torchvision's ReLU6(inplace=True): a layer's pre-activation output is saved by no one (a leaf,
        # which autograd forbids changing, is copied)
        if y.grad_fn is None:
            y = y.clone()
        else:
            ctx.mark_dirty(y)
        out = torch.nn.functional.relu6(y, inplace=True) if handoff.activation == "relu6" else torch.relu_(y)
        ctx.handoff = handoff
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if ctx.handoff.applied:
            return grad, None
        (out,) = ctx.saved_tensors  # autograd's own: y <= 0 (or y >= 6) is out == 0 (or out == 6)
        if ctx.handoff.activation == "relu6":
            return torch.ops.aten.hardtanh_backward(grad, out, 0.0, 6.0), None
        return torch.ops.aten.threshold_backward(grad, out, 0), None


def hand_off_activation(y: torch.Tensor, activation: str) -> torch.Tensor | None:
    """``activation(y)`` marked for the activation quantizer that consumes it alone (graph-checked by
    :func:`qat.quant.prepare.prepare`): its kernel then applies the activation's gradient mask with its own.
    ``None`` where this does not apply (no kernel, not float32 on the CPU, no gradient)."""
    if not (activation in ACTIVATION_CODES and applies(y) and torch.is_grad_enabled() and y.requires_grad
            and cpu_kernel.ops() is not None):
        return None
    handoff = ActivationHandoff(activation)
    out = _HandedOffActivation.apply(y, handoff)
    out._qat_handoff = handoff  # type: ignore[attr-defined]
    return out


class _EmaFakeQuantize(torch.autograd.Function):
    """:func:`ema_fake_quantize`: the new state is returned without gradient; the backward is ``grad · mask``,
    or, for a handed-over ReLU/ReLU6 output, that activation's gradient mask and this one in one pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, running_min: torch.Tensor, running_max: torch.Tensor, first: bool,
                decay: float, qmin: int, qmax: int, symmetric: bool, eps: float,
                handoff: ActivationHandoff | None) -> tuple[torch.Tensor, ...]:
        code = ACTIVATION_CODES[handoff.activation] if handoff is not None else 0
        out, mask, low, high, scale, zero_point = cpu_kernel.ops().ema_fake_quantize(
            x, running_min, running_max, first, decay, 1 - decay, qmin, qmax, symmetric, eps, code)
        ctx.handoff = handoff
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(low, high, scale, zero_point)
        ctx.set_materialize_grads(False)  # no zero tensors for the state's (absent) gradients
        return out, low, high, scale, zero_point

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        (mask,) = ctx.saved_tensors
        if grad is None:  # only the state outputs were used (their gradients are not materialized)
            return (None,) * 10
        if ctx.handoff is None:
            return (cpu_kernel.ops().fake_quantize_backward(grad, mask),) + (None,) * 9
        ctx.handoff.applied = True
        relu6 = ctx.handoff.activation == "relu6"  # its backward keeps grad's layout, ReLU's keeps x's
        return (cpu_kernel.ops().coded_mask_backward(grad, mask, relu6),) + (None,) * 9


def ema_fake_quantize(x: torch.Tensor, running_min: torch.Tensor, running_max: torch.Tensor, decay: float,
                      qmin: int, qmax: int, symmetric: bool, eps: float) -> tuple[torch.Tensor, ...]:
    """``(fq(x), min, max, S, Z)``: a per-tensor EMA activation quantizer's training step (Jacob §3.1: the range
    m <- decay·m + (1 - decay)·batch, the first batch (empty ``running_min``) setting it; (S, Z) from it; eq. 12)
    in one call of qat's C++ kernel, with the float32 arithmetic of :mod:`qat.quant.fused`."""
    first = running_min.numel() == 0
    handoff = getattr(x, "_qat_handoff", None)
    return _EmaFakeQuantize.apply(x, running_min, running_max, first, decay, qmin, qmax, symmetric, eps, handoff)


def channel_vectors_kernel(var: torch.Tensor, *vectors: torch.Tensor | None) -> Any | None:
    """qat's kernel ops for the per-channel vector ops (BN folds, running-statistics update) of float32 CPU vectors
    as long as ``var`` (absent ones: ``None``), or ``None`` where they do not apply."""
    if not (applies(var) and all(v is None or (v.dtype == torch.float32 and v.device == var.device
                                                 and v.numel() == var.numel()) for v in vectors)):
        return None
    return cpu_kernel.ops()


def integer_bias_kernel(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> Any | None:
    """qat's kernel ops for the simulated int32 bias (Jacob §2.4) of a float32 CPU bias vector, or ``None``."""
    if not (applies(bias) and bias.dim() == 1 and input_scale.numel() == 1
            and weight_scale.numel() in (1, bias.numel())
            and all(t.dtype == torch.float32 and t.device == bias.device for t in (input_scale, weight_scale))):
        return None
    return cpu_kernel.ops()


def applies(x: torch.Tensor) -> bool:
    """Whether these ops reproduce torch's kernels for ``x``: float32 on the CPU (CUDA keeps torch's fused
    kernels, which are vectorized already), in eager mode: under ``torch.compile`` their data-dependent branches
    (is Z zero, can anything be clipped) would break the graph, and the compiler fuses torch's ops itself."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling()


def channel_shape(x: torch.Tensor, axis: int) -> tuple[int, ...]:
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return tuple(shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> torch.Tensor:
    """``torch.fake_quantize_per_tensor_affine`` (``axis=None``; 0-d or 1-element ``scale``/``zero_point``) or
    ``torch.fake_quantize_per_channel_affine`` along ``axis``, for a float32 CPU ``x``."""
    if cpu_kernel.ops() is not None:
        fused_axis = -1 if axis is None else axis % x.dim()
        return _FusedFakeQuantize.apply(x, scale.float(), zero_point, qmin, qmax, fused_axis, True)
    shape = () if axis is None else channel_shape(x, axis)
    return _FakeQuantize.apply(x, scale.float(), zero_point, qmin, qmax, shape, bool(zero_point.any()))


def fake_quantize_without_sync(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                               qmax: int, axis: int) -> torch.Tensor:
    """The per-channel fake quantizer as the same ops with no data-dependent branch, on any device: torch's own
    per-channel op reads the smallest and largest Z back to the host to check them (two device syncs per call on
    a GPU, which a CUDA graph cannot capture) and its arithmetic (``1.0f/S`` per element, then as above) is
    these ops'. Used on CUDA and under ``torch.compile``."""
    return _FakeQuantize.apply(x, scale.float(), zero_point, qmin, qmax, channel_shape(x, axis), True)


def fake_quantize_unclipped(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, low: torch.Tensor,
                            high: torch.Tensor, qmin: int, qmax: int, axis: int) -> torch.Tensor | None:
    """Per-channel fake quantization of ``x`` whose per-channel extremes along ``axis`` are ``low``/``high``
    (the range its observer just took from it), without clamp and mask when no element can be clipped; ``None``
    when some channel's extreme quantizes outside [qmin, qmax] (then use :func:`fake_quantize`)."""
    scale = scale.float()
    inverse = torch.reciprocal(scale)
    z = zero_point.to(torch.float32)
    lowest = torch.mul(low, inverse).round_().add_(z)  # the same float ops as the elements: monotone in x
    highest = torch.mul(high, inverse).round_().add_(z)
    if not (bool((lowest >= qmin).all()) and bool((highest <= qmax).all())):
        return None
    if cpu_kernel.ops() is not None:
        return _FusedFakeQuantize.apply(x, scale, zero_point, qmin, qmax, axis % x.dim(), False)
    shape = channel_shape(x, axis)
    return _Unclipped.apply(x, inverse.reshape(shape), z.reshape(shape), scale.reshape(shape),
                            bool(zero_point.any()))


__all__ = ["ACTIVATION_CODES", "ActivationHandoff", "applies", "batch_moments", "channel_shape",
           "channel_vectors_kernel", "ema_fake_quantize", "fake_quantize", "fake_quantize_unclipped",
           "fake_quantize_without_sync", "fold_fake_quantize_weight", "hand_off_activation", "integer_bias_kernel",
           "per_channel_kernel"]
