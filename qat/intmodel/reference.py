"""Integer-only reference executor of the canonical integer model (Jacob et al. 2018 §2, gemmlowp/TFLite).

Float images enter, are quantized once at the input boundary (like TFLite's QUANTIZE op; the rounding is
torch's ``nearbyint(x · (1/S))`` so that it matches the simulation and PyTorch's kernels), and every op after
that is integer arithmetic on int32 values held in int64 tensors:

* conv2d / linear (Jacob eq. 7-9): acc = Σ (q_in - Z_in)(q_w - Z_w) + bias, in int64 and checked to fit int32;
  then ``MultiplyByQuantizedMultiplier(acc, M0, -n)`` per output channel, + Z_out, clamp to the fused
  activation's range (TFLite ``reference_integer_ops::ConvPerChannel``; Jacob §2.4 for ReLU as a clamp).
* add: TFLite's quantized ADD — inputs shifted left by L, rescaled by their multipliers, summed, requantized.
* cat: each input (q - Z_i)·2^L requantized by S_i/S_out·2^-L with the same primitive.
* average pool: integer sum, divided with rounding half away from zero (TFLite ``AveragePool``); max pool,
  flatten: integer max and reshape.

Logits leave through the only other float step, r = S(q - Z). Values outside int32 are a QatError naming the
layer (gemmlowp assumes accumulators never overflow), never a silent float fallback.

``accumulation="pair16"`` emulates x86 int8 kernels without VNNI: conv (groups 1) and linear layers sum
uint8 × int8 product pairs in saturating int16 before int32 (:mod:`qat.intmodel.saturation`), so a VNNI or ARM
machine shows what an AVX2 deployment of the same integer model returns.

``rounding="double"`` (default) is gemmlowp's and TFLite's default requantization (SRDHM, then
RoundingDivideByPOT: two roundings); ``rounding="single"`` is TFLite built with ``TFLITE_SINGLE_ROUNDING``
(one rounding of x·M0·2^-(31+n)), the one that matches a simulation which rounds r/S once per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import QatError
from qat.intmodel.gemmlowp import (
    check_int32,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single_rounding,
    saturating_cast,
)
from qat.intmodel.graph import IntModel, IntNode, TensorQ, as_pair
from qat.intmodel.saturation import is_pair16_layer, saturated_accumulator

Kernel = Callable[..., torch.Tensor]
Requantizer = Callable[[torch.Tensor, torch.Tensor | int, torch.Tensor | int], torch.Tensor]
ROUNDINGS: dict[str, Requantizer] = {"double": multiply_by_quantized_multiplier,
                                     "single": multiply_by_quantized_multiplier_single_rounding}
ACCUMULATIONS = ("int32", "pair16")  # exact int32 (Jacob eq. 7) | x86 without VNNI (16-bit pair sums)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Broadcast a per-output-channel vector along axis 1 of an ``ndim``-d activation."""
    return t.to(torch.int64).reshape([1, -1] + [1] * (ndim - 2))


def quantize_input(x: torch.Tensor, out: TensorQ) -> torch.Tensor:
    """q = clamp(nearbyint(x · float32(1/S)) + Z, qmin, qmax): the one float → integer step (Jacob eq. 1)."""
    inv_scale = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(out.scale, dtype=torch.float32)
    q = torch.round(x.to(torch.float32) * inv_scale).to(torch.int64) + out.zero_point
    return saturating_cast(q, out.qmin, out.qmax).to(torch.int32)


def dequantize_output(q: torch.Tensor, q_params: TensorQ) -> torch.Tensor:
    """r = S (q - Z) in float32 (Jacob eq. 1), the exit from the integer domain."""
    return (q.to(torch.int64) - q_params.zero_point).to(torch.float32) * q_params.scale


def requantize(acc: torch.Tensor, node: IntNode, mbqm: Requantizer) -> torch.Tensor:
    """int32 accumulator → output grid: MBQM per channel, + Z_out, clamp (Jacob eq. 7 and §2.4)."""
    assert node.out is not None
    m0 = _channel_view(node.tensors["multiplier"], acc.dim())
    shift = _channel_view(node.tensors["shift"], acc.dim())
    q = mbqm(acc, m0, shift) + node.out.zero_point
    return saturating_cast(q, int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"])).to(torch.int32)


def _check_accumulator(acc: torch.Tensor, node: IntNode) -> None:
    if not check_int32(acc):
        raise QatError("intmodel", f"layer {node.name}: the int32 accumulator overflows "
                       f"(values reach [{int(acc.min())}, {int(acc.max())}])",
                       "use fewer weight/activation bits or smaller ranges for this layer")


def _matmul_operands(node: IntNode, in_q: TensorQ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(q_w - Z_w) and bias as int64, and Z_in: the zero-point terms of Jacob eq. 7 folded into operands."""
    w = node.tensors["weight"].to(torch.int64)
    w_zp = node.tensors["weight_zero_point"].to(torch.int64).reshape([-1] + [1] * (w.dim() - 1))
    return w - w_zp, node.tensors["bias"].to(torch.int64), in_q.zero_point


def pair16_kernel(node: IntNode, in_q: TensorQ, mbqm: Requantizer) -> Kernel:
    """Conv/linear as an x86 kernel without VNNI computes it: 16-bit saturating pair sums, then int32."""

    def run(x: torch.Tensor) -> torch.Tensor:
        acc = saturated_accumulator(x, node, in_q)
        _check_accumulator(acc, node)
        return requantize(acc, node, mbqm)

    return run


def conv2d_kernel(node: IntNode, in_q: TensorQ, mbqm: Requantizer) -> Kernel:
    """Integer convolution: torch's int64 convolution (exact integer GEMM) on zero-centred inputs.

    Subtracting Z_in before padding makes the zero padding equal real 0.0 (Jacob §2.1).
    """
    w, bias, z_in = _matmul_operands(node, in_q)
    a = node.attrs
    stride, padding, dilation, groups = as_pair(a["stride"]), as_pair(a["padding"]), as_pair(a["dilation"]), a["groups"]

    def run(x: torch.Tensor) -> torch.Tensor:
        acc = F.conv2d(x.to(torch.int64) - z_in, w, None, stride, padding, dilation, groups)
        acc = acc + bias.reshape(1, -1, 1, 1)
        _check_accumulator(acc, node)
        return requantize(acc, node, mbqm)

    return run


def linear_kernel(node: IntNode, in_q: TensorQ, mbqm: Requantizer) -> Kernel:
    """Integer fully connected layer: one int64 matmul, bias, requantization (TFLite FullyConnected)."""
    w, bias, z_in = _matmul_operands(node, in_q)
    w_t = w.t().contiguous()

    def run(x: torch.Tensor) -> torch.Tensor:
        acc = (x.to(torch.int64) - z_in) @ w_t + bias
        _check_accumulator(acc, node)
        return requantize(acc, node, mbqm)

    return run


def add_kernel(node: IntNode, in_qs: list[TensorQ], mbqm: Requantizer) -> Kernel:
    """TFLite quantized ADD (reference_ops::AddElementwise): headroom shift, per-input and output multipliers."""
    assert node.out is not None
    left = int(node.attrs["left_shift"])
    in_m0, in_shift = node.tensors["input_multiplier"], node.tensors["input_shift"]
    out_m0, out_shift = int(node.tensors["multiplier"][0]), int(node.tensors["shift"][0])
    low, high, z_out = int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"]), node.out.zero_point

    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.int64)
        for i, x in enumerate((a, b)):
            shifted = torch.bitwise_left_shift(x.to(torch.int64) - in_qs[i].zero_point, left)
            total = total + mbqm(shifted, int(in_m0[i]), int(in_shift[i]))
        q = mbqm(total, out_m0, out_shift) + z_out
        return saturating_cast(q, low, high).to(torch.int32)

    return run


def cat_kernel(node: IntNode, in_qs: list[TensorQ], mbqm: Requantizer) -> Kernel:
    """Concatenation: each input requantized to the output grid, (q - Z_i)·2^L · (S_i/S_out)·2^-L + Z_out."""
    assert node.out is not None
    left = int(node.attrs["left_shift"])
    in_m0, in_shift = node.tensors["input_multiplier"], node.tensors["input_shift"]
    low, high, z_out, dim = int(node.attrs["clamp_min"]), int(node.attrs["clamp_max"]), node.out.zero_point, \
        int(node.attrs["dim"])

    def run(*xs: torch.Tensor) -> torch.Tensor:
        parts = []
        for i, x in enumerate(xs):
            shifted = torch.bitwise_left_shift(x.to(torch.int64) - in_qs[i].zero_point, left)
            q = mbqm(shifted, int(in_m0[i]), int(in_shift[i]) + left) + z_out
            parts.append(saturating_cast(q, low, high))
        return torch.cat(parts, dim).to(torch.int32)

    return run


def rounding_divide(total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """TFLite AveragePool's division: (acc ± count/2) / count with C++ truncation (ties away from zero)."""
    count = torch.as_tensor(count, dtype=torch.int64)
    half = torch.div(count, 2, rounding_mode="floor")
    return torch.where(total > 0, torch.div(total + half, count, rounding_mode="trunc"),
                       torch.div(total - half, count, rounding_mode="trunc"))


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows: [floor(i·size/out), ceil((i+1)·size/out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _pool_output_size(size: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    """PyTorch's ``pooling_output_shape`` (the last window must start inside the padded input)."""
    span = size + 2 * pad - kernel
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _divisors(size: int, kernel: int, stride: int, pad: int, out: int, include_pad: bool) -> torch.Tensor:
    """Per-output-position element count of PyTorch's avg_pool2d along one axis."""
    counts = []
    for i in range(out):
        start = i * stride - pad
        end = min(start + kernel, size + pad)
        counts.append(end - start if include_pad else min(end, size) - max(start, 0))
    return torch.tensor(counts, dtype=torch.int64)


def avg_pool_kernel(node: IntNode, in_q: TensorQ) -> Kernel:
    """Average pooling on the input's grid: integer window sums, rounded integer division (TFLite AveragePool).

    Sums are taken over raw q; padded positions hold real 0.0, i.e. q = Z, which enters through count·Z.
    """
    a, z = node.attrs, in_q.zero_point

    def run_adaptive(x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(torch.int64)
        size = [s if s is not None else x.shape[2 + i] for i, s in enumerate(_pair_none(a["output_size"]))]
        rows = []
        for h0, h1 in _adaptive_bins(x.shape[2], size[0]):
            cols = [rounding_divide(x64[:, :, h0:h1, w0:w1].sum((2, 3)), (h1 - h0) * (w1 - w0))
                    for w0, w1 in _adaptive_bins(x.shape[3], size[1])]
            rows.append(torch.stack(cols, -1))
        return torch.stack(rows, -2).to(torch.int32)

    def run_windowed(x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = as_pair(a["kernel_size"]), as_pair(a["stride"]), as_pair(a["padding"])
        h, w = x.shape[2], x.shape[3]
        oh = _pool_output_size(h, kh, sh, ph, a.get("ceil_mode", False))
        ow = _pool_output_size(w, kw, sw, pw, a.get("ceil_mode", False))
        extra_h, extra_w = max(0, (oh - 1) * sh + kh - h - 2 * ph), max(0, (ow - 1) * sw + kw - w - 2 * pw)
        centred = F.pad(x.to(torch.int64) - z, (pw, pw + extra_w, ph, ph + extra_h))
        ones = torch.ones(x.shape[1], 1, kh, kw, dtype=torch.int64)
        sums = F.conv2d(centred, ones, None, (sh, sw), 0, 1, x.shape[1])
        if a.get("divisor_override"):
            count = torch.full((oh, ow), int(a["divisor_override"]), dtype=torch.int64)
        else:
            include = a.get("count_include_pad", True)
            count = torch.outer(_divisors(h, kh, sh, ph, oh, include), _divisors(w, kw, sw, pw, ow, include))
        return rounding_divide(sums + count * z, count).to(torch.int32)

    return run_adaptive if a["adaptive"] else run_windowed


def _pair_none(value: int | None | list[int | None]) -> list[int | None]:
    return [value, value] if value is None or isinstance(value, int) else list(value)


def max_pool_kernel(node: IntNode) -> Kernel:
    """Max pooling: an integer max over windows; the output stays on the input's grid."""
    a = node.attrs

    def run(x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(x.to(torch.int64), a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                         a["ceil_mode"])
        return y.to(torch.int32)

    return run


class ReferenceExecutor(nn.Module):
    """Runs an :class:`IntModel` with integer arithmetic only; float images in, float logits out."""

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
        self.mbqm = ROUNDINGS[rounding]
        q_of = {n.name: n.out for n in int_model.nodes}
        self.steps: list[tuple[IntNode, Kernel]] = []
        for node in int_model.nodes:
            in_qs = [q_of[i] for i in node.inputs]
            self.steps.append((node, self._kernel(node, in_qs)))
        self._by_name = {node.name: (node, kernel) for node, kernel in self.steps}

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
            return pair16_kernel(node, in_qs[0], self.mbqm)
        if op == "conv2d":
            return conv2d_kernel(node, in_qs[0], self.mbqm)
        if op == "linear":
            return linear_kernel(node, in_qs[0], self.mbqm)
        if op == "add":
            return add_kernel(node, in_qs, self.mbqm)
        if op == "cat":
            return cat_kernel(node, in_qs, self.mbqm)
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

    def run_node(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        """One node on given inputs (int tensors; a float batch for the input quantizer): layer-by-layer tests."""
        node, kernel = self._by_name[name]
        return kernel(*inputs)

    @torch.inference_mode()
    def run_layers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every node's integer output (int32) for a float batch, in graph order; the dequantize exit excluded."""
        self._check_input(x)
        values: dict[str, torch.Tensor] = {}
        for node, kernel in self.steps:
            if node.op == "dequantize":
                continue
            values[node.name] = kernel(*(values[i] for i in node.inputs)) if node.inputs else kernel(x)
        return values

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        values: dict[str, torch.Tensor] = {}
        result = x
        for node, kernel in self.steps:
            result = kernel(*(values[i] for i in node.inputs)) if node.inputs else kernel(x)
            values[node.name] = result
        return result


def build(int_model: IntModel, rounding: str = "double", accumulation: str = "int32") -> ReferenceExecutor:
    """The engine-style entry point (float images → float logits)."""
    return ReferenceExecutor(int_model, rounding, accumulation)


def engine_info(rounding: str = "double", accumulation: str = "int32") -> dict[str, str]:
    if accumulation == "pair16":
        return {"engine": f"reference_{rounding}_rounding_pair16",
                "engine_version": "gemmlowp-tflite, x86 16-bit pair accumulation (vpmaddubsw) emulated"}
    return {"engine": f"reference_{rounding}_rounding", "engine_version": "gemmlowp-tflite-int32"}
