"""The whitepaper fold while batch statistics train (Krishnamoorthi §3.2.2, Fig. 13), in closed form.

The convolution ``y`` ran with weights folded by the running sigma (``s = gamma / sigma`` per channel, the fold
factor), and the layer's output is batch norm with batch statistics of ``y / s + b`` (``b`` the conv bias): the
sigma/sigma_B correction and the batch-moment bias. Batch norm is invariant to its input's per-channel scale but for
eps, so per channel, in float64 from ``y``'s batch moments ``mu``, ``v`` (one float64 pass of sums of ``y`` and
``y^2``, rounded to float32)::

    var' = v / s^2,   d = sqrt(var' + eps) * s,   a = gamma / d
    out  = float(a) * (y - mu) + beta

and the statistics the running averages take are those of ``y / s + b``: ``mean' = mu / s + b`` and ``var'``. The
backward is batch norm's own carried through the division, from ``Sg = sum g`` and ``Sgy = sum g * y`` over the N
values of a channel (float64 sums of exact terms), then in float64 with ``k = 1 / d``::

    G      = k * (Sgy - mu * Sg)                (sum g * xhat: gamma's gradient; beta's is Sg)
    grad_y = (float(a) * g + float(c1) * (y - mu)) + float(c0),   c1 = -a * k * G / N,   c0 = -a * Sg / N
    grad_s = -(gamma / s) * G * eps / (var' + eps)                (b's gradient is 0)

qat's kernel computes it (``qat_cpu.whitepaper_batch_norm_train``: two passes over ``y`` forward, two backward,
autograd in C++). Everywhere else (no kernel, CUDA, autocast's reduced precision, torch.compile) the
division and ``F.batch_norm`` run, whose fused kernels are fast there. The two are not bit for bit equal: the closed
form is as close to the float64 truth as the division's path or closer, and ``s``'s gradient, which the division's
path takes as a difference of large terms, is exact (``tests/test_cpu_kernel.py``). Like Jacob's batch moments
(:func:`qat.quant.vectorized.batch_moments`), a rounding difference in the batch statistics can move a code at a
rounding boundary, and training with batch statistics then takes a neighbouring path; with frozen batch norm (the
default schedule) both paths are bit for bit equal.
"""

from __future__ import annotations

from typing import Any

import torch

from qat.quant import vectorized


def kernel_for(y: torch.Tensor, *vectors: torch.Tensor | None) -> Any | None:
    """qat's kernel ops where the closed form applies to ``y`` (float32 NCHW/NHWC CPU, eager, kernel built) and
    ``vectors`` (one contiguous float32 value per channel each; ``None`` an absent optional one), else ``None``."""
    if not all(v is None or v.is_contiguous() for v in vectors):
        return None
    return vectorized.per_channel_kernel(y, *vectors)


def whitepaper_batch_norm(y: torch.Tensor, s: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                          bias: torch.Tensor | None, running_mean: torch.Tensor, running_var: torch.Tensor,
                          momentum: float, eps: float, kernel: Any) -> torch.Tensor:
    """Batch norm with batch statistics of ``y / s + b`` by qat's kernel (``kernel_for``), the running statistics
    updated in place from those of ``y / s + b`` as ``nn.BatchNorm2d`` updates them (momentum; the variance made
    unbiased)."""
    return kernel.whitepaper_batch_norm_train(y, s, gamma, beta, bias, running_mean, running_var, momentum, eps)
