"""The whitepaper fold while batch statistics train (Krishnamoorthi §3.2.2, Fig. 13), in closed form.

The convolution ``y`` ran with weights folded by the running sigma (``s = gamma / sigma`` per channel, the fold
factor), and the layer's output is batch norm with batch statistics of ``y / s + b`` (``b`` the conv bias): the
sigma/sigma_B correction and the batch-moment bias. Batch norm is invariant to its input's per-channel scale but for
eps, so per channel, in float64 from ``y``'s float32 batch moments ``mu``, ``v``::

    var' = v / s^2,   d = sqrt(var' + eps) * s,   a = gamma / d
    out  = float(a) * (y - mu) + beta

and the statistics the running averages take are those of ``y / s + b``: ``mean' = mu / s + b`` and ``var'``. The
backward is batch norm's own carried through the division, from ``Sg = sum g`` and ``Sgy = sum g * y`` over the N
values of a channel (float64 sums of exact terms), then in float64 with ``k = 1 / d``::

    G      = k * (Sgy - mu * Sg)                (sum g * xhat: gamma's gradient; beta's is Sg)
    grad_y = (float(a) * g + float(c1) * (y - mu)) + float(c0),   c1 = -a * k * G / N,   c0 = -a * Sg / N
    grad_s = -(gamma / s) * G * eps / (var' + eps)                (b's gradient is 0)

Two implementations of these very operations: qat's kernel (``qat_cpu.whitepaper_batch_norm``, one pass over ``y``
after the moments, two backward) and the ATen ops below (the path without the kernel). Per-element float32
arithmetic and per-channel float64 arithmetic are the same operations in the same order; the reductions (moments,
``Sg``, ``Sgy``) are float64 in both but summed in another order, so the two agree bit for bit except where float64
error meets a float32 rounding boundary: a moment or coefficient then differs by one ulp (as
:func:`qat.quant.vectorized.batch_moments`), and a sum that is itself at rounding-noise level (a gradient that is
zero in exact arithmetic, e.g. a shift that a later batch norm removes) differs as noise does. Against the division
followed by ``F.batch_norm`` (what CUDA and reduced precision run) the closed form is as close to the float64 truth
or closer, and ``s``'s gradient, which the division's path takes as a difference of large terms, is exact
(``tests/test_cpu_kernel.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from qat.quant import vectorized

DIMS = (0, 2, 3)


def applies(y: torch.Tensor) -> bool:
    """The closed form runs on float32 CPU activations (kernel or ATen); elsewhere (CUDA, autocast's reduced
    precision) the division and ``F.batch_norm``, whose fused kernels are fast there."""
    return y.device.type == "cpu" and y.dtype == torch.float32 and y.dim() == 4


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


def _layout(y: torch.Tensor) -> torch.memory_format:
    nhwc = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def _forward_aten(y: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                  bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, ...]:
    var_y, mean_y = torch.var_mean(y, dim=DIMS, unbiased=False)
    sd = s.double()
    v = var_y.double() / (sd * sd)
    a = (gamma.double() / ((v + eps).sqrt() * sd)).float()
    mean = (mean_y.double() / sd + (bias.double() if bias is not None else 0.0)).float()
    out = _channel(a) * (y - _channel(mean_y)) + _channel(beta)
    return out, mean_y, var_y, mean, v.float()


def _backward_aten(grad: torch.Tensor, y: torch.Tensor, mean_y: torch.Tensor, var_y: torch.Tensor, s: torch.Tensor,
                   gamma: torch.Tensor, eps: float, need_y: bool) -> tuple[torch.Tensor | None, ...]:
    g = grad.contiguous(memory_format=_layout(y))
    gd = g.double()
    sum_g, sum_gy = gd.sum(DIMS), (gd * y.double()).sum(DIMS)  # float32 products are exact in float64
    count = float(y.numel() // max(y.shape[1], 1))
    sd, gm = s.double(), gamma.double()
    v = var_y.double() / (sd * sd)
    d = (v + eps).sqrt() * sd
    k, a = 1.0 / d, gm / d
    sg = sum_g
    big_g = k * (sum_gy - mean_y.double() * sg)
    grad_y = None
    if need_y:
        c1, c0 = (-a * k * big_g / count).float(), (-a * sg / count).float()
        grad_y = (_channel(a.float()) * g + _channel(c1) * (y - _channel(mean_y))) + _channel(c0)
    grad_s = (-(gm / sd) * big_g * eps / (v + eps)).float()
    return grad_y, grad_s, big_g.float(), sum_g.float()


class _WhitepaperBatchNorm(torch.autograd.Function):
    """:func:`whitepaper_batch_norm` on the ATen ops, with its backward (the kernel's twin,
    ``qat_cpu.whitepaper_batch_norm_train``, has its autograd in C++)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, mean_y, var_y, mean, var = _forward_aten(y, s, gamma, beta, bias, eps)
        ctx.eps = eps
        ctx.save_for_backward(y, mean_y, var_y, s, gamma)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        y, mean_y, var_y, s, gamma = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_y, grad_s, grad_gamma, grad_beta = _backward_aten(grad, y, mean_y, var_y, s, gamma, ctx.eps, need[0])
        return (grad_y if need[0] else None, grad_s.reshape(s.shape) if need[1] else None,
                grad_gamma if need[2] else None, grad_beta if need[3] else None,
                torch.zeros_like(s) if need[4] else None,  # batch norm removes a per-channel shift exactly
                None)


def whitepaper_batch_norm(y: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                          bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch norm with batch statistics of ``y / s + b`` for a float32 CPU ``y`` (:func:`applies`): the output, and
    the batch mean and biased variance of ``y / s + b`` for the running averages (without gradient)."""
    kernel = vectorized.per_channel_kernel(y, s, gamma, beta, bias)
    if kernel is not None:
        return kernel.whitepaper_batch_norm_train(y, s, gamma, beta, bias, eps)
    return _WhitepaperBatchNorm.apply(y, s, gamma, beta, bias, eps)
