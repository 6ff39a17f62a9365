"""QAT modules: convolution with batch-norm folding and a fused activation, and linear (Jacob §3, App. C).

Weights are fake-quantized after folding, so the simulated weights are exactly the integer model's weights.
Three batch-norm treatments are selectable (``bn_fold``):

* ``jacob``: Jacob et al. eq. 14 / Fig. C.8. A float convolution gives the batch moments (mu_B, sigma_B);
  the folded weight w·gamma/sigma_B is quantized and convolved, then the folded bias beta - gamma·mu_B/sigma_B
  is added. After the BN-freeze step the running moments replace the batch moments.
* ``whitepaper``: Krishnamoorthi §3.2.2 / Fig. 13. Weights are folded with the running sigma, and the output
  is corrected by sigma/sigma_B (and the bias taken from batch moments) until the freeze step; after it the
  running statistics are used and the correction is 1. One quantized convolution per step.
* ``unfolded``: BN kept in float after a quantized convolution, for ablations (the integer model folds it at
  conversion, so simulation and integer model differ by design).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import choice_error
from qat.quant import fused, vectorized, whitepaper_bn
from qat.quant.fake_quant import FakeQuantize, fold_and_quantize

BN_FOLD_MODES = ("jacob", "whitepaper", "unfolded")
ACTIVATIONS = ("none", "relu", "relu6")


class IntegerBias:
    """Simulates the int32 bias of the integer model: b -> S_in·S_w·round(b / (S_in·S_w)), straight-through
    gradient (Jacob §2.4: bias quantized with zero point 0 and scale S_in·S_w). Active only while the input
    and weight quantizers both quantize; the input quantizer is bound by :func:`qat.quant.prepare.prepare`."""

    weight_ndim = 4  # conv; QLinear: 2

    def bind_input_quantizer(self, fq: FakeQuantize) -> None:
        object.__setattr__(self, "_input_fq", fq)  # a reference, not a submodule: no duplicate state

    def quantized_bias(self, bias: torch.Tensor | None, weight_fq: FakeQuantize) -> torch.Tensor | None:
        fq = getattr(self, "_input_fq", None)
        if bias is None or fq is None or not (fq.quantizing and fq.observer.initialized and weight_fq.quantizing
                                              and weight_fq.observer.initialized):
            return bias
        spec = weight_fq.spec
        if spec.per_channel and spec.ch_axis % self.weight_ndim != 0:
            return bias  # per-input-channel weight grids (weight_ch_axis != 0) have no integer bias
        kernel = vectorized.integer_bias_kernel(bias, fq.scale, weight_fq.scale)
        if kernel is not None:  # the ops below in one call, the gradient the identity as theirs
            return _IntegerBias.apply(bias, fq.scale, weight_fq.scale, kernel)
        # float64 like the conversion (qat.intmodel.convert), so both round the same ties
        scale = fq.scale.to(bias.device).double().reshape(()) * weight_fq.scale.to(bias.device).double().reshape(-1)
        rounded = torch.round(bias.double() / scale).clamp(-(2**31), 2**31 - 1) * scale
        return bias + (rounded.to(bias.dtype) - bias).detach()


class _RunningFold(torch.autograd.Function):
    """:meth:`QConvBnAct.fold_factor_and_bias` by qat's kernel (``qat_cpu.running_fold``), forward and backward
    element for element the ATen ops'."""

    @staticmethod
    def forward(ctx: Any, gamma: torch.Tensor | None, beta: torch.Tensor | None, bias: torch.Tensor | None,
                mean: torch.Tensor, var: torch.Tensor, eps: float, kernel: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.kernel, ctx.eps = kernel, eps
        ctx.save_for_backward(gamma, bias, mean, var)
        factor, folded = kernel.running_fold(gamma, beta, bias, mean, var, eps)
        if gamma is None:  # no BN weight: the factor is a constant, as on the ATen path
            ctx.mark_non_differentiable(factor)
        return factor, folded

    @staticmethod
    def backward(ctx: Any, grad_factor: torch.Tensor | None,
                 grad_bias: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        gamma, bias, mean, var = ctx.saved_tensors
        d_gamma, d_beta, d_bias = ctx.kernel.running_fold_backward(grad_factor, grad_bias, gamma, bias, mean, var,
                                                                   ctx.eps)
        need = ctx.needs_input_grad
        return (d_gamma if need[0] and (grad_factor is not None or grad_bias is not None) else None,
                d_beta if need[1] and grad_bias is not None else None,
                d_bias if need[2] and grad_bias is not None else None, None, None, None, None)


class _BatchFold(torch.autograd.Function):
    """Jacob eq. 14's fold factor and folded bias from the batch moments by qat's kernel (``qat_cpu.batch_fold``),
    forward and backward element for element the ATen ops of :meth:`QConvBnAct._forward_jacob`."""

    @staticmethod
    def forward(ctx: Any, var: torch.Tensor, mean: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                bias: torch.Tensor | None, eps: float, kernel: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.kernel, ctx.eps = kernel, eps
        ctx.save_for_backward(var, mean, gamma, bias)
        return kernel.batch_fold(var, mean, gamma, beta, bias, eps)

    @staticmethod
    def backward(ctx: Any, grad_factor: torch.Tensor | None,
                 grad_bias: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        var, mean, gamma, bias = ctx.saved_tensors
        d_var, d_mean, d_gamma, d_beta, d_bias = ctx.kernel.batch_fold_backward(grad_factor, grad_bias, var, mean,
                                                                                gamma, bias, ctx.eps)
        need, has_bias = ctx.needs_input_grad, grad_bias is not None
        return (d_var if need[0] else None, d_mean if need[1] and has_bias else None, d_gamma if need[2] else None,
                d_beta if need[3] and has_bias else None, d_bias if need[4] and has_bias else None, None, None)


class _IntegerBias(torch.autograd.Function):
    """:meth:`IntegerBias.quantized_bias` by qat's kernel (``qat_cpu.integer_bias``): straight-through gradient."""

    @staticmethod
    def forward(ctx: Any, bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor,
                kernel: Any) -> torch.Tensor:
        return kernel.integer_bias(bias, input_scale, weight_scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad, None, None, None


class _DivideByChannel(torch.autograd.Function):
    """``y / s`` for a per-channel ``s``, with autograd's own division gradients (DivBackward0: ``g / s`` and
    ``-g · (y / s) / s`` summed to ``s``'s shape) computed from the saved quotient instead of recomputing
    ``y / s``: the same values bit for bit, two full passes fewer in the backward (the whitepaper fold wherever qat's
    kernel does not run it in closed form, :mod:`qat.quant.whitepaper_bn`)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = y / s
        ctx.save_for_backward(out, s)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        out, s = ctx.saved_tensors
        grad_y = grad / s if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = (out / s).mul_(grad).sum_to_size(s.shape).neg_()
        return grad_y, grad_s


def apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(x)
    if activation == "relu6":
        return F.relu6(x)
    return x


class QConvBnAct(IntegerBias, nn.Module):
    """conv -> (BN) -> activation with a weight fake-quantizer applied after folding."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, activation: str,
                 weight_fq: FakeQuantize, bn_fold: str = "jacob") -> None:
        super().__init__()
        if bn_fold not in BN_FOLD_MODES:
            raise choice_error("quant.bn_fold", bn_fold, BN_FOLD_MODES)
        if activation not in ACTIVATIONS:
            raise choice_error("quant.activation", activation, ACTIVATIONS)
        self.conv = conv
        self.bn = bn
        self.activation = activation
        self.weight_fq = weight_fq
        self.bn_fold = bn_fold
        self.bn_frozen = False
        # set by qat.quant.prepare when this layer's only consumer is an activation quantizer: the ReLU/ReLU6
        # gradient mask may then be applied by that quantizer's kernel (qat.quant.vectorized.hand_off_activation)
        self.activation_handoff = False

    def extra_repr(self) -> str:
        return f"activation={self.activation}, bn_fold={self.bn_fold}, bn_frozen={self.bn_frozen}"

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        if c.padding_mode != "zeros":
            raise NotImplementedError("only zero padding is supported")
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def _use_batch_stats(self) -> bool:
        return self.training and not self.bn_frozen

    def fold_factor_and_bias(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The running-statistics fold (the inference-time fold, Jacob eq. 14): the factor gamma/sigma per output
        channel that multiplies the weight (``None`` without batch norm) and the folded bias."""
        if self.bn is None:
            w = self.conv.weight
            return None, self.conv.bias if self.conv.bias is not None else w.new_zeros(w.shape[0])
        bn = self.bn
        kernel = vectorized.channel_vectors_kernel(bn.running_var, bn.weight, bn.bias, self.conv.bias, bn.running_mean)
        if kernel is not None:  # the ops below in one call each way
            return _RunningFold.apply(bn.weight, bn.bias, self.conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                      kernel)
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
        b = self.conv.bias if self.conv.bias is not None else torch.zeros_like(inv_std)
        return gamma * inv_std, beta + (b - bn.running_mean) * gamma * inv_std

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias folded with the running statistics (Jacob eq. 14)."""
        factor, b = self.fold_factor_and_bias()
        w = self.conv.weight
        return (w if factor is None else w * factor.reshape(-1, 1, 1, 1)), b

    def _quantized_running_fold(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution with the running-statistics fold, weights and bias quantized (frozen BN, no BN)."""
        factor, b = self.fold_factor_and_bias()
        w_q = fold_and_quantize(self.weight_fq, self.conv.weight, factor)
        return self._conv(x, w_q, self.quantized_bias(b, self.weight_fq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            y = self._quantized_running_fold(x)
        elif self.bn_fold == "unfolded":  # batch norm after the quantized conv; frozen: running statistics
            bn, training = self.bn, self._use_batch_stats()
            y = F.batch_norm(self._conv(x, fold_and_quantize(self.weight_fq, self.conv.weight), self.conv.bias),
                             bn.running_mean,
                             bn.running_var, bn.weight, bn.bias, training, self._momentum() if training else 0.0,
                             bn.eps)
        elif self.bn_fold == "jacob":
            y = self._forward_jacob(x)
        else:
            y = self._forward_whitepaper(x)
        if self.activation_handoff and self.training and fused.ENABLED:
            out = vectorized.hand_off_activation(y, self.activation)
            if out is not None:
                return out
        return apply_activation(y, self.activation)

    def _batch_moments(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch mean and biased variance per channel; update the running statistics like nn.BatchNorm2d."""
        bn = self.bn
        assert bn is not None
        if y.dtype in (torch.float16, torch.bfloat16):  # batch moments in float32 under autocast
            y = y.float()
        var, mean = vectorized.batch_moments(y)
        self._update_running_stats(mean, var, y.numel() / y.shape[1])
        return mean, var

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """nn.BatchNorm2d's update from batch moments over ``n`` values (the variance made unbiased)."""
        bn = self.bn
        assert bn is not None
        momentum = self._momentum()
        kernel = vectorized.channel_vectors_kernel(var, mean, bn.running_mean, bn.running_var)
        if kernel is not None and bn.running_mean.is_contiguous() and bn.running_var.is_contiguous():
            kernel.update_running_stats(bn.running_mean, bn.running_var, mean.detach(), var.detach(), momentum, n)
            return  # the updates below in one call, element for element
        with torch.no_grad():
            bn.running_mean.mul_(1 - momentum).add_(momentum * mean)
            bn.running_var.mul_(1 - momentum).add_(momentum * var * n / max(n - 1, 1))

    def _forward_jacob(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        assert bn is not None
        if not self._use_batch_stats():
            return self._quantized_running_fold(x)
        mean, var = self._batch_moments(self._conv(x, self.conv.weight, self.conv.bias))
        gamma, beta = bn.weight, bn.bias
        kernel = vectorized.channel_vectors_kernel(var, mean, gamma, beta, self.conv.bias)
        if kernel is not None and gamma is not None and beta is not None:  # the ops below in one call each way
            factor, b_fold = _BatchFold.apply(var, mean, gamma, beta, self.conv.bias, bn.eps, kernel)
            w_q = fold_and_quantize(self.weight_fq, self.conv.weight, factor)
            return self._conv(x, w_q, self.quantized_bias(b_fold, self.weight_fq))
        inv_std = torch.rsqrt(var + bn.eps)
        conv_bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(mean)
        b_fold = beta + (conv_bias - mean) * gamma * inv_std
        w_q = fold_and_quantize(self.weight_fq, self.conv.weight, gamma * inv_std)
        return self._conv(x, w_q, self.quantized_bias(b_fold, self.weight_fq))

    def _forward_whitepaper(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        assert bn is not None
        if not self._use_batch_stats():
            return self._quantized_running_fold(x)
        running_std = torch.sqrt(bn.running_var + bn.eps)
        scale = bn.weight / running_std
        y = self._conv(x, fold_and_quantize(self.weight_fq, self.conv.weight, scale))
        # y / (gamma / sigma) is the (quantized) unscaled convolution; batch norm with batch statistics on it
        # equals the sigma/sigma_B output correction plus the batch-moment bias of whitepaper Fig. 13.
        kernel = whitepaper_bn.kernel_for(y, scale, bn.weight, bn.bias, self.conv.bias, bn.running_mean,
                                          bn.running_var)
        if kernel is not None and bn.bias is not None and bn.running_mean is not None:  # the lines below in closed
            return whitepaper_bn.whitepaper_batch_norm(  # form, one call each way, running statistics included
                y, scale, bn.weight, bn.bias, self.conv.bias, bn.running_mean, bn.running_var, self._momentum(),
                bn.eps, kernel)
        y = _DivideByChannel.apply(y, scale.reshape(1, -1, 1, 1))
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(1, -1, 1, 1)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                            self._momentum(), bn.eps)

    def _momentum(self) -> float:
        bn = self.bn
        assert bn is not None
        bn.num_batches_tracked += 1
        return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


class QLinear(IntegerBias, nn.Module):
    """Linear layer with fake-quantized weights (per output channel = axis 0)."""

    weight_ndim = 2

    def __init__(self, linear: nn.Linear, weight_fq: FakeQuantize) -> None:
        super().__init__()
        self.linear = linear
        self.weight_fq = weight_fq

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.linear.weight
        b = self.linear.bias if self.linear.bias is not None else torch.zeros_like(w[:, 0])
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_q = fold_and_quantize(self.weight_fq, self.linear.weight)
        return F.linear(x, w_q, self.quantized_bias(self.linear.bias, self.weight_fq))
