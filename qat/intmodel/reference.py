"""Integer-only reference executor of the canonical integer model (Jacob et al. 2018 §2, gemmlowp/TFLite).

Float images enter, are quantized once at the input boundary (like TFLite's QUANTIZE op; the rounding is
torch's ``nearbyint(x · (1/S))`` so that it matches the simulation and PyTorch's kernels), and every op after
that computes exactly what integer arithmetic computes (codes travel as float32, exact up to 2^24):

* conv2d / linear (Jacob eq. 7-9): acc = Σ (q_in - Z_in)(q_w - Z_w) + bias, an int32 accumulator; then
  ``MultiplyByQuantizedMultiplier(acc, M0, -n)`` per output channel, + Z_out, clamp to the fused activation's
  range (TFLite ``reference_integer_ops::ConvPerChannel``; Jacob §2.4 for ReLU as a clamp).
* add: TFLite's quantized ADD — inputs shifted left by L, rescaled by their multipliers, summed, requantized.
* cat: each input (q - Z_i)·2^L requantized by S_i/S_out·2^-L with the same primitive.
* mul: TFLite's quantized MUL, (q_a - Z_a)(q_b - Z_b) requantized by S_a·S_b/S_out (squeeze-excite);
  hardswish / hardsigmoid: a table over the input grid (:mod:`qat.intmodel.elementwise`).
* average pool: integer window sum of q − Z divided with ties to even like most engines (TFLite's ``AveragePool``
  rounds half away from zero; :mod:`qat.intmodel.pooling` says why); max pool, flatten: integer max and reshape.

Exact and fast: the sums of integer products run in float GEMMs (oneDNN/BLAS), exact because a bound per layer
from its input grid and its integer weights, max|q_in - Z_in| · Σ_k |q_w - Z_w|, caps every partial sum
(:class:`AccumulatorPlan`: float32 below 2^24, else the input split into float32 digits, else float64 below
2^53), with transform algorithms and reduced-precision modes switched off (:func:`exact_float_kernels`).
Requantization is gemmlowp's arithmetic as one int64 floor division
(:class:`qat.intmodel.gemmlowp.FixedPointConstants`). Accumulators that may leave int32 are checked: values
outside int32 are a QatError naming the layer (gemmlowp assumes accumulators never overflow), never a silent
float fallback.

``accumulation="pair16"`` emulates x86 int8 kernels without VNNI: conv (groups 1) and linear layers sum
uint8 × int8 product pairs in saturating int16 before int32 (:mod:`qat.intmodel.saturation`), so a VNNI or ARM
machine shows what an AVX2 deployment of the same integer model returns.

``rounding="double"`` (default) is gemmlowp's and TFLite's default requantization (SRDHM, then
RoundingDivideByPOT: two roundings); ``rounding="single"`` is TFLite built with ``TFLITE_SINGLE_ROUNDING``
(one rounding of x·M0·2^-(31+n)), the one that matches a simulation which rounds r/S once per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import QatError
from qat.intmodel.elementwise import TABLE_OPS, activation_table, check_mul_accumulator, mul_codes
from qat.intmodel.gemmlowp import (
    INT32_MAX,
    apply_multiplier,
    check_int32,
    fixed_point_constants,
    fixed_point_multiply,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_rounding,
)
from qat.intmodel.graph import IntModel, IntNode, TensorQ, as_pair
from qat.intmodel.pooling import FLOAT32_EXACT, average_pool_centred
from qat.intmodel.saturation import is_pair16_layer, saturated_accumulator

Kernel = Callable[..., torch.Tensor]
Requantizer = Callable[[torch.Tensor, torch.Tensor | int, torch.Tensor | int], torch.Tensor]
ROUNDINGS: dict[str, Requantizer] = {"double": multiply_by_quantized_multiplier,
                                     "single": multiply_by_quantized_multiplier_single_rounding}
ACCUMULATIONS = ("int32", "pair16")  # exact int32 (Jacob eq. 7) | x86 without VNNI (16-bit pair sums)
VALUES = torch.float32  # the executor's container of integer codes: exact for grids up to 2^24
FLOAT64_EXACT = 2**53
MAX_DIGITS = 3  # float32 convolutions per layer before one float64 convolution is cheaper (measured: 3-11x)
CHUNK_ELEMENTS = 1 << 20  # int64 block of the requantization arithmetic (8 MiB: cache-sized, few parallel regions)
TABLE_ENTRIES = 1 << 18  # add/mul: code pairs tabulated (two 8-bit or 9-bit grids), 1 MiB of float32


@contextmanager
def exact_float_kernels() -> Iterator[None]:
    """Float kernels whose sums of integer products are exact below 2^24 (float32) / 2^53 (float64).

    Direct and GEMM convolutions add exact products in some order, and every partial sum is bounded by the sum
    of |products|. Transform algorithms (NNPACK's and cuDNN's Winograd/FFT) and reduced-precision modes (TF32,
    oneDNN's bf16 fpmath) are not exact, so they are switched off while the reference runs.
    """
    precisions = (torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul, torch.backends.cuda.matmul)
    saved = [p.fp32_precision for p in precisions], torch.backends.cudnn.enabled
    for p in precisions:
        p.fp32_precision = "ieee"
    torch.backends.cudnn.enabled = False
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        for p, value in zip(precisions, saved[0], strict=True):
            p.fp32_precision = value
        torch.backends.cudnn.enabled = saved[1]


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Broadcast a per-output-channel vector along axis 1 of an ``ndim``-d activation."""
    return t.to(torch.int64).reshape([1, -1] + [1] * (ndim - 2))


def batch_chunks(t: torch.Tensor) -> Iterator[tuple[slice, ...]]:
    """Index blocks of about :data:`CHUNK_ELEMENTS` elements: whole images, or row bands of one image when an image
    is larger (contiguous in channels-last memory). Int64 temporaries of a block stay in cache and in the
    allocator's heap instead of streaming through memory once per operation."""
    if t.dim() == 4 and t.shape[0] and t[0].numel() > CHUNK_ELEMENTS:
        band = max(1, CHUNK_ELEMENTS // max(1, t.shape[1] * t.shape[3]))
        for image in range(t.shape[0]):
            for top in range(0, t.shape[2], band):
                yield slice(image, image + 1), slice(None), slice(top, top + band)
        return
    step = max(1, CHUNK_ELEMENTS // max(1, t[0].numel())) if t.shape[0] else 1
    for start in range(0, t.shape[0], step):
        yield (slice(start, start + step),)


def empty_codes(shape: torch.Size | list[int], device: torch.device) -> torch.Tensor:
    """An uninitialised code tensor: channels-last when 4-d (oneDNN's fast layout; exactness is order-free)."""
    if len(shape) == 4:
        return torch.empty(shape, dtype=VALUES, device=device, memory_format=torch.channels_last)
    return torch.empty(shape, dtype=VALUES, device=device)


def quantize_input(x: torch.Tensor, out: TensorQ) -> torch.Tensor:
    """q = clamp(nearbyint(x · float32(1/S)) + Z, qmin, qmax): the one float → integer step (Jacob eq. 1)."""
    inv_scale = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(out.scale, dtype=torch.float32)
    codes = empty_codes(x.shape, x.device)
    for rows in batch_chunks(x):
        q = torch.round(x[rows].to(torch.float32) * inv_scale).to(torch.int64).add_(out.zero_point)
        codes[rows] = q.clamp_(out.qmin, out.qmax)
    return codes


def dequantize_output(q: torch.Tensor, q_params: TensorQ) -> torch.Tensor:
    """r = S (q - Z) in float32 (Jacob eq. 1), the exit from the integer domain."""
    return (q.to(torch.int64) - q_params.zero_point).to(torch.float32) * q_params.scale


def _check_accumulator(acc: torch.Tensor, node: IntNode) -> None:
    if not check_int32(acc):
        raise QatError("intmodel", f"layer {node.name}: the int32 accumulator overflows "
                       f"(values reach [{int(acc.min())}, {int(acc.max())}])",
                       "use fewer weight/activation bits or smaller ranges for this layer")


def largest_code(grid: TensorQ, offset: int) -> int:
    """max |q - offset| over a grid (offset Z: the largest input factor of Jacob eq. 7's products)."""
    return max(abs(grid.qmin - offset), abs(grid.qmax - offset))


@dataclass(frozen=True)
class AccumulatorPlan:
    """How a conv/linear layer's Σ (q_in - Z_in)(q_w - Z_w) is computed exactly in floating point.

    ``bound`` = max|GEMM input| · max over output channels of Σ_k |q_w - Z_w|: no partial sum of any summation
    order exceeds it. Below 2^24 one float32 GEMM is exact; otherwise the input is split into ``digits``
    base-2^``digit_bits`` digits (each convolved in float32 with its own bound below 2^24, then recombined in
    int64), or, when more than :data:`MAX_DIGITS` would be needed, one float64 GEMM (exact below 2^53).
    """

    dtype: torch.dtype
    digits: int
    digit_bits: int
    bound: int
    int32_safe: bool  # |Σ| + |bias| <= 2^31 - 1 in every channel: the int32 check cannot fail

    def describe(self) -> str:
        if self.dtype == torch.float64:
            return "float64"
        return "float32" if self.digits == 1 else f"float32 x{self.digits} digits"


def _digit_range(x_max: int, digits: int, bits: int) -> int:
    """The largest |digit| when |x| <= x_max is split into ``digits`` base-2^bits digits (the top one signed)."""
    if digits == 1:
        return x_max
    top = -(-x_max // (1 << (bits * (digits - 1))))  # floor(-x_max / 2^k) = -ceil(x_max / 2^k)
    return max(top, (1 << bits) - 1)


def plan_accumulator(name: str, x_max: int, centred_max: int, w_centred: torch.Tensor,
                     bias: torch.Tensor) -> AccumulatorPlan:
    """The cheapest exact float form of a layer's GEMM over inputs |x| <= ``x_max`` with these integer weights;
    ``centred_max`` = max|q_in - Z_in| and ``bias`` bound the int32 accumulator Σ (q_in - Z_in)(q_w - Z_w) + b."""
    row_sums = w_centred.abs().flatten(1).sum(1)
    w_sum = int(row_sums.max()) if row_sums.numel() else 0
    bound = x_max * w_sum
    worst = int((centred_max * row_sums + bias.abs()).max()) if row_sums.numel() else 0
    safe = worst <= INT32_MAX
    for digits in range(1, MAX_DIGITS + 1):
        for bits in range(1, max(2, x_max.bit_length() + 1)):
            if _digit_range(x_max, digits, bits) * w_sum < FLOAT32_EXACT:
                return AccumulatorPlan(torch.float32, digits, bits if digits > 1 else 0, bound, safe)
    if bound < FLOAT64_EXACT:
        return AccumulatorPlan(torch.float64, 1, 0, bound, safe)
    raise QatError("intmodel", f"layer {name}: accumulators can reach {bound} >= 2^53, beyond exact float64 sums "
                   "(and far beyond int32)", "use fewer weight/activation bits for this layer")


def split_digits(x: torch.Tensor, plan: AccumulatorPlan) -> list[torch.Tensor]:
    """x = Σ_j 2^(d·j) · digit_j, lowest digit first: digits in [0, 2^d), the top one signed (floor division)."""
    parts, rest, base = [], x, float(1 << plan.digit_bits)
    for _ in range(plan.digits - 1):
        high = torch.floor(rest * (1.0 / base))
        parts.append(torch.add(rest, high, alpha=-base))
        rest = high
    return [*parts, rest]


def combine_digits(sums: list[torch.Tensor], plan: AccumulatorPlan) -> torch.Tensor:
    """Σ_j 2^(d·j) · sums_j in int64 (the exact accumulator)."""
    acc = sums[-1].to(torch.int64)
    for part in reversed(sums[:-1]):
        acc.mul_(1 << plan.digit_bits).add_(part.to(torch.int64))
    return acc


class Requantize:
    """Accumulator → output codes: MBQM per output channel, + Z_out, clamp (Jacob eq. 7 and §2.4; TFLite
    ``ConvPerChannel``), with gemmlowp's roundings as one fixed-point floor division
    (:class:`qat.intmodel.gemmlowp.FixedPointConstants`). ``bias`` (int64 per channel) is folded into the
    rounding constant as b·M0, for accumulators known to fit int32 with it. The accumulator is overwritten."""

    def __init__(self, node: IntNode, rounding: str, ndim: int, bias: torch.Tensor | None = None) -> None:
        assert node.out is not None
        view = [1, -1] + [1] * (ndim - 2)
        m0, shift = node.tensors["multiplier"].to(torch.int64), node.tensors["shift"].to(torch.int64)
        self.constants = fixed_point_constants(m0.reshape(view), shift.reshape(view), rounding)
        self.extra = None if bias is None else (bias.to(torch.int64) * m0).reshape(view)
        self.low, self.high = int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"])
        self.zero_point = node.out.zero_point
        self.relu_like = self.low >= self.zero_point

    def can_fold_bias(self) -> bool:
        return self.constants.left is None

    def __call__(self, acc: torch.Tensor) -> torch.Tensor:
        """int64 accumulator → int64 output codes."""
        y = fixed_point_multiply(acc, self.constants, saturate_input=False, extra_offset=self.extra,
                                 negatives_clamped=self.relu_like, reuse_input=True)
        return y.add_(self.zero_point).clamp_(self.low, self.high)


def _centred_weight(node: IntNode) -> torch.Tensor:
    """q_w - Z_w (int64): the weight factor of Jacob eq. 7's products."""
    w = node.tensors["weight"].to(torch.int64)
    return w - node.tensors["weight_zero_point"].to(torch.int64).reshape([-1] + [1] * (w.dim() - 1))


class MatmulKernel:
    """Integer conv2d / linear: exact float GEMMs per :class:`AccumulatorPlan`, then :class:`Requantize`
    (TFLite ``ConvPerChannel`` / ``FullyConnected``), batch chunk by batch chunk.

    A padded convolution's input is centred, q - Z_in, before its zero padding, so that padding is real 0.0
    (Jacob §2.1); without padding the GEMM takes q and -Z_in·Σ_k (q_w - Z_w) joins the bias (Jacob eq. 8's
    zero-point term), which saves a pass over the input.
    """

    def __init__(self, node: IntNode, in_q: TensorQ, rounding: str) -> None:
        self.node = node
        w = _centred_weight(node)
        a = node.attrs
        self.conv_args = (as_pair(a["stride"]), as_pair(a["padding"]), as_pair(a["dilation"]), a["groups"]) \
            if node.op == "conv2d" else None
        padded = self.conv_args is not None and any(self.conv_args[1])
        self.offset = in_q.zero_point if padded else 0
        bias = node.tensors["bias"].to(torch.int64)
        self.plan = plan_accumulator(node.name, largest_code(in_q, self.offset),
                                     largest_code(in_q, in_q.zero_point), w, bias)
        bias = bias + (self.offset - in_q.zero_point) * w.flatten(1).sum(1)
        self._weights = PerDevice(w.to(self.plan.dtype))
        ndim = 4 if self.conv_args is not None else 2
        requant = Requantize(node, rounding, ndim)
        # b·M0 joins the rounding constant when every int64 step provably stays in range (all factors < 2^31)
        self.fold = (self.plan.int32_safe and requant.can_fold_bias() and self.plan.bound <= INT32_MAX
                     and int(bias.abs().max()) <= INT32_MAX) if bias.numel() else False
        self.requantize = Requantize(node, rounding, ndim, bias) if self.fold else requant
        self.bias = _channel_view(bias, ndim)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weights.like(x)
        if self.conv_args is None:
            return F.linear(x, w)
        return F.conv2d(x, w, None, *self.conv_args)

    def sums(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The float GEMMs of the plan's digits of q - offset (one tensor unless the input is split)."""
        x = x.to(self.plan.dtype)
        if self.offset:
            x = x - self.offset
        if self.plan.digits == 1:
            return [self._gemm(x)]
        return [self._gemm(d) for d in split_digits(x, self.plan)]

    def accumulator(self, sums: list[torch.Tensor], rows: slice) -> torch.Tensor:
        """The int32 accumulator of a batch chunk in int64, without the bias where it is folded."""
        acc = combine_digits([s[rows] for s in sums], self.plan)
        if not self.fold:
            acc.add_(_on_device(self.bias, acc))
            if not self.plan.int32_safe:
                _check_accumulator(acc, self.node)
        return acc

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sums = self.sums(x)
        codes = empty_codes(sums[0].shape, sums[0].device)
        for rows in batch_chunks(sums[0]):
            codes[rows] = self.requantize(self.accumulator(sums, rows))
        return codes


def _on_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.device == like.device else t.to(like.device)


class PerDevice:
    """A constant tensor (a weight, a lookup table) with one cached copy per device it is used on."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._copies = {tensor.device: tensor}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._copies:
            self._copies[x.device] = next(iter(self._copies.values())).to(x.device)
        return self._copies[x.device]


def pair16_kernel(node: IntNode, in_q: TensorQ, rounding: str) -> Kernel:
    """Conv/linear as an x86 kernel without VNNI computes it: 16-bit saturating pair sums, then int32."""
    requant = Requantize(node, rounding, 4 if node.op == "conv2d" else 2)

    def run(x: torch.Tensor) -> torch.Tensor:
        acc = saturated_accumulator(x, node, in_q)
        _check_accumulator(acc, node)
        return requant(acc).to(VALUES)

    return run


def _rescaled_inputs(node: IntNode, in_qs: list[TensorQ], rounding: str,
                     extra_shift: int = 0) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Input i of an add/cat as (q - Z_i)·2^L, rescaled by its multiplier (M0_i, n_i + ``extra_shift``)."""
    left = int(node.attrs["left_shift"])
    in_m0, in_shift = node.tensors["input_multiplier"], node.tensors["input_shift"]
    constants = [fixed_point_constants(int(in_m0[i]), int(in_shift[i]) + extra_shift, rounding)
                 for i in range(len(in_qs))]

    def rescale(i: int, x: torch.Tensor) -> torch.Tensor:
        shifted = x.to(torch.int64, copy=True).sub_(in_qs[i].zero_point).bitwise_left_shift_(left)
        return apply_multiplier(shifted, constants[i], reuse_input=True)

    return rescale


def grid_codes(grid: TensorQ) -> torch.Tensor:
    """Every code of a grid, qmin..qmax (int64)."""
    return torch.arange(grid.qmin, grid.qmax + 1, dtype=torch.int64)


def gather_codes(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] elementwise in index's layout: one gather from a cache-resident table (index_select over a
    flat view of channels-last or contiguous memory)."""
    if index.dim() == 4 and not index.is_contiguous() and index.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = index.shape
        flat = torch.index_select(table, 0, index.permute(0, 2, 3, 1).reshape(-1))
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return torch.index_select(table, 0, index.reshape(-1)).view(index.shape)


class PairTableKernel:
    """An elementwise op of two integer inputs (broadcasting) whose output is a function of the code pair.

    For grids with at most :data:`TABLE_ENTRIES` code pairs it is tabulated once by the op's own integer
    :meth:`arithmetic` and looked up (one gather per element); wider grids run the arithmetic chunk by chunk."""

    def __init__(self, node: IntNode, in_qs: list[TensorQ], rounding: str) -> None:
        """The output requantization (node's multiplier, shift, clamp and Z_out), then the table."""
        assert node.out is not None
        self.out = fixed_point_constants(int(node.tensors["multiplier"][0]), int(node.tensors["shift"][0]),
                                         rounding)
        self.low, self.high, self.z_out = int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"]), \
            node.out.zero_point
        self.grids = in_qs
        size_a, size_b = (q.qmax - q.qmin + 1 for q in in_qs)
        self.table: PerDevice | None = None
        if size_a * size_b <= TABLE_ENTRIES:
            pairs = self.arithmetic(grid_codes(in_qs[0]).reshape(-1, 1), grid_codes(in_qs[1]).reshape(1, -1))
            self.table = PerDevice(pairs.reshape(-1).to(VALUES))
            self.index_scale = size_b
            self.index_offset = -(in_qs[0].qmin * size_b + in_qs[1].qmin)

    def arithmetic(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The op on int codes (broadcasting), as int64 codes."""
        raise NotImplementedError

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.table is not None:  # index (a - qmin_a)·|grid b| + (b - qmin_b): exact in float32 (< 2^24)
            index = torch.add(b.to(VALUES), a.to(VALUES), alpha=self.index_scale).add_(self.index_offset)
            return gather_codes(self.table.like(index), index.to(torch.int64))
        a, b = torch.broadcast_tensors(a, b)
        codes = empty_codes(a.shape, a.device)
        for rows in batch_chunks(a):
            codes[rows] = self.arithmetic(a[rows], b[rows])
        return codes


class AddKernel(PairTableKernel):
    """TFLite quantized ADD (reference_ops::AddElementwise): headroom shift, per-input and output multipliers."""

    def __init__(self, node: IntNode, in_qs: list[TensorQ], rounding: str) -> None:
        self.rescale = _rescaled_inputs(node, in_qs, rounding)
        super().__init__(node, in_qs, rounding)

    def arithmetic(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = self.rescale(0, a).add_(self.rescale(1, b)) if a.shape == b.shape else \
            self.rescale(0, a) + self.rescale(1, b)
        return apply_multiplier(total, self.out, reuse_input=True).add_(self.z_out).clamp_(self.low, self.high)


class MulKernel(PairTableKernel):
    """TFLite quantized MUL (reference_integer_ops::MulElementwise), squeeze-excite's gate × input
    (:func:`qat.intmodel.elementwise.mul_codes`)."""

    def __init__(self, node: IntNode, in_qs: list[TensorQ], rounding: str) -> None:
        check_mul_accumulator(node.name, in_qs)
        super().__init__(node, in_qs, rounding)

    def arithmetic(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mul_codes(a, b, self.grids, self.out, self.z_out, self.low, self.high)


class TableKernel:
    """hardswish / hardsigmoid: one gather from the table over the input grid
    (:func:`qat.intmodel.elementwise.activation_table`, equal to the simulation code for code)."""

    def __init__(self, node: IntNode, in_q: TensorQ) -> None:
        assert node.out is not None
        self.table = PerDevice(activation_table(node.op, in_q, node.out).to(VALUES))
        self.qmin = in_q.qmin

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return gather_codes(self.table.like(x), (x.to(VALUES) - self.qmin).to(torch.int64))


class CatKernel:
    """Concatenation: each input requantized to the output grid, (q - Z_i)·2^L · (S_i/S_out)·2^-L + Z_out,
    tabulated over each input grid by this arithmetic and looked up."""

    def __init__(self, node: IntNode, in_qs: list[TensorQ], rounding: str) -> None:
        assert node.out is not None
        rescale = _rescaled_inputs(node, in_qs, rounding, int(node.attrs["left_shift"]))
        low, high, z_out = int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"]), node.out.zero_point
        self.tables = [PerDevice(rescale(i, grid_codes(q)).add_(z_out).clamp_(low, high).to(VALUES))
                       for i, q in enumerate(in_qs)]
        self.grids, self.dim = in_qs, int(node.attrs["dim"])

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        parts = [gather_codes(table.like(x), (x.to(VALUES) - q.qmin).to(torch.int64))
                 for table, q, x in zip(self.tables, self.grids, xs, strict=True)]
        return torch.cat(parts, self.dim)


def avg_pool_kernel(node: IntNode, in_q: TensorQ) -> Kernel:
    """Average pooling on the input's grid: integer window sums of q − Z divided with ties to even, + Z
    (:mod:`qat.intmodel.pooling`, shared with the simulation)."""
    attrs, z, largest = node.attrs, in_q.zero_point, largest_code(in_q, in_q.zero_point)

    def run(x: torch.Tensor) -> torch.Tensor:
        return (average_pool_centred(x - z, attrs, largest) + z).to(VALUES)

    return run


def max_pool_kernel(node: IntNode) -> Kernel:
    """Max pooling: a max over windows of exact integer codes; the output stays on the input's grid."""
    a = node.attrs

    def run(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x.to(VALUES), a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                            a["ceil_mode"])

    return run


class ReferenceExecutor(nn.Module):
    """Runs an :class:`IntModel` with integer arithmetic only; float images in, float logits out.

    Integer codes travel between ops as float32 (:data:`VALUES`, exact for every grid of at most 16 bits);
    :meth:`run_layers` and :meth:`run_node` hand them out as int32. ``plans`` records each conv/linear layer's
    exact float form (:class:`AccumulatorPlan`).
    """

    def __init__(self, int_model: IntModel, rounding: str = "double", accumulation: str = "int32") -> None:
        super().__init__()
        if rounding not in ROUNDINGS:
            raise QatError("reference.rounding", f"unknown value {rounding!r}", "choose double or single")
        if accumulation not in ACCUMULATIONS:
            raise QatError("reference.accumulation", f"unknown value {accumulation!r}", "choose int32 or pair16")
        int_model.validate()
        self.int_model = int_model
        self.rounding = rounding
        self.accumulation = accumulation
        q_of = {n.name: n.out for n in int_model.nodes}
        self.plans: dict[str, AccumulatorPlan] = {}
        self.steps: list[tuple[IntNode, Kernel]] = []
        for node in int_model.nodes:
            in_qs = [q_of[i] for i in node.inputs]
            self.steps.append((node, self._kernel(node, in_qs)))
        self._by_name = {node.name: (node, kernel) for node, kernel in self.steps}
        last = {name: step for step, (node, _) in enumerate(self.steps) for name in node.inputs}
        self._last_read: dict[int, list[str]] = {}
        for name, step in last.items():
            self._last_read.setdefault(step, []).append(name)

    def _kernel(self, node: IntNode, in_qs: list[TensorQ | None]) -> Kernel:
        op = node.op
        if op == "quantize":
            out = node.out
            assert out is not None
            return lambda x: quantize_input(x, out)
        if op == "dequantize":
            source = in_qs[0]
            assert source is not None
            return lambda q: dequantize_output(q, source)
        if self.accumulation == "pair16" and is_pair16_layer(node):
            return pair16_kernel(node, in_qs[0], self.rounding)
        if op in ("conv2d", "linear"):
            kernel = MatmulKernel(node, in_qs[0], self.rounding)
            self.plans[node.name] = kernel.plan
            return kernel
        if op == "add":
            return AddKernel(node, in_qs, self.rounding)
        if op == "cat":
            return CatKernel(node, in_qs, self.rounding)
        if op == "mul":
            return MulKernel(node, in_qs, self.rounding)
        if op in TABLE_OPS:
            return TableKernel(node, in_qs[0])
        if op == "avg_pool":
            return avg_pool_kernel(node, in_qs[0])
        if op == "max_pool":
            return max_pool_kernel(node)
        if op == "flatten":
            start = int(node.attrs["start_dim"])
            return lambda q: torch.flatten(q, start)
        raise QatError("intmodel", f"layer {node.name}: op {op!r} has no integer reference implementation",
                       "convert the model with this qat version")

    def _check_input(self, x: torch.Tensor) -> None:
        expected = self.int_model.input_shape
        if not x.is_floating_point() or (expected and (x.dim() != len(expected) or x.shape[1] != expected[1])):
            raise QatError("input", f"the reference executor expects float images shaped like {expected}, "
                           f"got {x.dtype} {list(x.shape)}", "pass a float batch N×C×H×W with the model's channels")

    def _check_codes(self, node: IntNode, inputs: tuple[torch.Tensor, ...]) -> None:
        """Inputs handed to :meth:`run_node` lie on their grids (the exact float forms rely on it)."""
        for name, x in zip(node.inputs, inputs, strict=True):
            grid = self._by_name[name][0].out
            if grid is not None and x.numel() and (float(x.min()) < grid.qmin or float(x.max()) > grid.qmax):
                raise QatError("input", f"layer {node.name}: input {name} leaves its grid [{grid.qmin}, "
                               f"{grid.qmax}]", "pass integer codes of the producing layer's grid")

    @torch.inference_mode()
    def run_node(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        """One node on given inputs (integer codes; a float batch for the input quantizer), as int32:
        layer-by-layer tests."""
        node, kernel = self._by_name[name]
        if node.inputs:
            self._check_codes(node, inputs)
        with exact_float_kernels():
            return kernel(*inputs).to(torch.int32)

    def _run(self, x: torch.Tensor, keep_all: bool) -> dict[str, torch.Tensor]:
        """Every step in order; unless ``keep_all``, each value is dropped after its last reader (as eager
        evaluation frees activations), and only the logits remain."""
        self._check_input(x)
        values: dict[str, torch.Tensor] = {}
        with exact_float_kernels():
            for step, (node, kernel) in enumerate(self.steps):
                if node.op == "dequantize" and keep_all:
                    continue
                values[node.name] = kernel(*(values[i] for i in node.inputs)) if node.inputs else kernel(x)
                if not keep_all:
                    for name in self._last_read.get(step, ()):
                        del values[name]
        return values

    @torch.inference_mode()
    def run_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every node's integer output (int32) for a float batch, in graph order; the dequantize exit excluded."""
        return {name: v.to(torch.int32) for name, v in self._run(x, keep_all=True).items()}

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, keep_all=False)[self.steps[-1][0].name]


def on_device(int_model: IntModel, device: torch.device) -> IntModel:
    """A copy of ``int_model`` whose tensors are on ``device`` (the kernels' constants derive from them)."""
    nodes = [replace(n, tensors={k: t.to(device) for k, t in n.tensors.items()}) for n in int_model.nodes]
    return replace(int_model, nodes=nodes)


def build(int_model: IntModel, rounding: str = "double", accumulation: str = "int32",
          device: torch.device | str = "cpu") -> ReferenceExecutor:
    """The engine-style entry point (float images → float logits) on ``device``: CUDA runs the same exact float
    GEMMs (cuDNN off, TF32 off: :func:`exact_float_kernels`). The pair16 emulation runs on the CPU only."""
    device = torch.device(device)
    if device.type != "cpu":
        if accumulation == "pair16":
            raise QatError("latency.eval_device", f"the pair16 reference runs on the CPU only, not {device}",
                           "set latency.eval_device=cpu, or drop reference_pair16 from latency.eval_engines")
        int_model = on_device(int_model, device)
    return ReferenceExecutor(int_model, rounding, accumulation)


def engine_info(rounding: str = "double", accumulation: str = "int32") -> dict[str, str]:
    if accumulation == "pair16":
        return {"engine": f"reference_{rounding}_rounding_pair16",
                "engine_version": "gemmlowp-tflite, x86 16-bit pair accumulation (vpmaddubsw) emulated"}
    return {"engine": f"reference_{rounding}_rounding", "engine_version": "gemmlowp-tflite-int32"}
