"""Adapter: PyTorch's native quantized CPU kernels (x86/fbgemm, qnnpack) via ``torch.ops.quantized``.

These kernels (and quantized tensors) are deprecated upstream; this file is the only place that touches
them. Activations run as quint8 and weights as qint8; grids narrower than 8 bits run exactly in 8-bit
containers, and signed activation grids are shifted by 128 into quint8 (same scale, Z + 128), which is exact.

fbgemm's (and the x86 backend's) depthwise int8 convolution sums uint8×int8 products in saturating 16-bit
arithmetic: with large weights and input codes it is off by tens of LSB (up to 95 on the demo's MobileNet v2),
where every other op is within one LSB of the integer-only reference. By default those backends therefore run
depthwise convolutions on qnnpack's kernel (a weight prepacked by qnnpack runs qnnpack's kernel whatever engine is
selected); ``exact_depthwise=False`` keeps fbgemm's, and :func:`engine_info` records which one ran. A PyTorch
build without qnnpack cannot do this: fbgemm's kernel runs, a warning says so when the engine is built, and
``depthwise_kernels``/``status_note`` in :func:`engine_info` (and on the engine) say so in the record.

MobileNet v3's hardswish and squeeze-excite product run on torch's quantized hardswish and mul kernels; its
hardsigmoid runs in float between dequantize and quantize (aten's quantized hardsigmoid writes a fixed (1/256, 0)
grid). :func:`elementwise_kernels` (in :func:`engine_info`) says which of these steps are float arithmetic.

Other ops (average pooling, add) also dispatch on the global ``torch.backends.quantized.engine`` and round
differently on x86/fbgemm and qnnpack, so each model sets its own backend for the duration of ``forward`` (and
restores the previous one): a model built later with another backend does not change its arithmetic.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qat.compat.torch_private import make_per_channel_quantized_tensor, make_per_tensor_quantized_tensor
from qat.errors import QatError
from qat.intmodel.graph import IntModel, IntNode, TensorQ

log = logging.getLogger("qat")

BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")
SATURATING_DEPTHWISE = ("x86", "fbgemm")  # backends whose depthwise int8 kernel saturates 16-bit sums


@contextmanager
def quantized_engine(backend: str) -> Iterator[None]:
    """``torch.backends.quantized.engine = backend`` inside the block; the previous engine restored after."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _check_container(q: TensorQ, where: str) -> None:
    low = q.qmin + q.uint8_offset
    high = q.qmax + q.uint8_offset
    if low < 0 or high > 255:
        raise QatError("engine", f"{where}: {q.bits}-bit activations do not fit the 8-bit kernels of torch_native",
                       "use activations of 8 bits or fewer on this engine")


def _weight_tensor(node: IntNode) -> torch.Tensor:
    w = node.tensors["weight"]
    if w.min() < -128 or w.max() > 127:
        raise QatError("engine", f"{node.name}: {node.attrs['weight_bits']}-bit weights do not fit int8 kernels",
                       "use weights of 8 bits or fewer on torch_native")
    scale = node.tensors["weight_scale"].double()
    zero_point = node.tensors["weight_zero_point"].long()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if node.attrs["weight_per_channel"]:
            return make_per_channel_quantized_tensor(w.to(torch.int8), scale, zero_point, 0)
        return make_per_tensor_quantized_tensor(w.to(torch.int8), float(scale[0]), int(zero_point[0]))


def _bias_float(node: IntNode) -> torch.Tensor:
    return (node.tensors["bias"].double() * node.tensors["bias_scale"].double()).float()


def _code_bounds(node: IntNode) -> tuple[int, int] | None:
    """A node's integer clamp [max(clamp_min, qmin), min(clamp_max, qmax)] in the uint8 container, where the
    container and the kernel's own ReLU do not already give it: ReLU6's upper bound, and the grid of a <8-bit
    output (e.g. [0, 127] for 7-bit activations) after ops whose kernels saturate to [0, 255] only (quantize,
    convolutions without activation, linear, add, cat). ``None`` where nothing is left to clamp."""
    out = node.out
    if out is None or node.op in ("dequantize", "max_pool", "avg_pool", "flatten"):  # these keep their input grid
        return None
    low = max(node.attrs.get("clamp_min", out.qmin), out.qmin)
    high = min(node.attrs.get("clamp_max", out.qmax), out.qmax)
    relu = node.attrs.get("activation") in ("relu", "relu6")  # the kernel's ReLU clamps at real 0, code Z
    needs_low = low + out.uint8_offset > 0 and not (relu and low <= out.zero_point)
    if not needs_low and high + out.uint8_offset >= 255:
        return None
    return low + out.uint8_offset, high + out.uint8_offset


def _clamped(fn: Callable[..., torch.Tensor], codes: tuple[int, int] | None) -> Callable[..., torch.Tensor]:
    """``fn`` followed by a clamp of its quantized output's codes to ``codes``, in integers: exact on every
    backend (qnnpack's quantized ``torch.clamp`` wants both bounds and left MobileNet-like layers tens of LSB off)."""
    if codes is None:
        return fn
    low, high = codes

    def run(*args: torch.Tensor) -> torch.Tensor:
        y = fn(*args)
        return make_per_tensor_quantized_tensor(y.int_repr().clamp_(low, high), y.q_scale(), y.q_zero_point())

    return run


class TorchNativeModel(nn.Module):
    """Runs an :class:`IntModel` on ``torch.ops.quantized`` kernels; float in, float logits out."""

    def __init__(self, model: IntModel, backend: str = "x86", exact_depthwise: bool = True) -> None:
        super().__init__()
        if backend not in torch.backends.quantized.supported_engines:
            raise QatError("engine.backend", f"{backend!r} is not available in this PyTorch build",
                           "choose one of: " + ", ".join(torch.backends.quantized.supported_engines))
        self.backend = backend
        self.depthwise_backend = depthwise_backend(backend, exact_depthwise)
        self.depthwise_kernels = depthwise_kernels(backend, exact_depthwise)
        self.status_note = status_note(backend, exact_depthwise)
        self.int_model = model
        self.steps: list[tuple[str, list[str], Callable[..., torch.Tensor]]] = []
        self.packed: list[object] = []  # keeps prepacked weights alive
        # left selected after building, as before, for tools that run ``steps`` one by one (wrap such loops in
        # ``quantized_engine(engine.backend)``); ``forward`` selects its own backend whatever is selected then
        torch.backends.quantized.engine = backend
        for node in model.nodes:
            self.steps.append((node.name, node.inputs, _clamped(self._build(node), _code_bounds(node))))
        self.emulated_bits = model.min_bits < 8  # <8-bit grids in 8-bit containers
        if self.status_note is not None and exact_depthwise and any(
                n.op == "conv2d" and n.attrs["groups"] > 1 for n in model.nodes):
            log.warning("[torch_native_%s] %s", backend, self.status_note)

    def _build(self, node: IntNode) -> Callable[..., torch.Tensor]:
        out = node.out
        if out is not None:
            _check_container(out, node.name)
        q = torch.ops.quantized
        if node.op == "quantize":
            scale, zp = out.scale, out.uint8_zero_point
            return lambda x: torch.quantize_per_tensor(x, scale, zp, torch.quint8)
        if node.op == "dequantize":
            return lambda x: x.dequantize()
        if node.op == "conv2d":
            a = node.attrs
            if a["groups"] > 1 and self.depthwise_backend != self.backend:
                torch.backends.quantized.engine = self.depthwise_backend
            try:
                packed = q.conv2d_prepack(_weight_tensor(node), _bias_float(node), a["stride"], a["padding"],
                                          a["dilation"], a["groups"])
            finally:
                torch.backends.quantized.engine = self.backend
            self.packed.append(packed)
            scale, zp = out.scale, out.uint8_zero_point
            kernel = q.conv2d_relu if a["activation"] in ("relu", "relu6") else q.conv2d
            return lambda x: kernel(x, packed, scale, zp)
        if node.op == "linear":
            packed = q.linear_prepack(_weight_tensor(node), _bias_float(node))
            self.packed.append(packed)
            scale, zp = out.scale, out.uint8_zero_point
            return lambda x: q.linear(x, packed, scale, zp)
        if node.op == "add":
            scale, zp = out.scale, out.uint8_zero_point
            kernel = q.add_relu if node.attrs["activation"] == "relu" else q.add
            return lambda a, b: kernel(a, b, scale, zp)
        if node.op == "avg_pool":
            a = node.attrs
            if a["adaptive"]:
                size = a["output_size"]
                return lambda x: F.adaptive_avg_pool2d(x, size)
            return lambda x: F.avg_pool2d(x, a["kernel_size"], a["stride"], a["padding"])
        if node.op == "max_pool":
            a = node.attrs
            return lambda x: F.max_pool2d(x, a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                          a["ceil_mode"])
        if node.op == "flatten":
            start = node.attrs["start_dim"]
            return lambda x: torch.flatten(x, start)
        if node.op == "cat":
            scale, zp, dim = out.scale, out.uint8_zero_point, node.attrs["dim"]
            return lambda *xs: q.cat(list(xs), dim, scale, zp)
        if node.op == "hardswish":
            scale, zp = out.scale, out.uint8_zero_point
            return lambda x: q.hardswish(x, scale, zp)
        if node.op == "hardsigmoid":  # in float: aten's quantized kernel writes a fixed grid (elementwise_kernels)
            scale, zp = out.scale, out.uint8_zero_point
            return lambda x: torch.quantize_per_tensor(F.hardsigmoid(x.dequantize()), scale, zp, torch.quint8)
        if node.op == "mul":  # broadcasts squeeze-excite's (N, C, 1, 1) gate
            scale, zp = out.scale, out.uint8_zero_point
            return lambda a, b: q.mul(a, b, scale, zp)
        raise QatError("engine", f"op {node.op!r} of {node.name} is not supported by torch_native", "")

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits for the float batch ``x``, on this model's backend whatever engine is selected now."""
        values: dict[str, torch.Tensor] = {}
        result = x
        with quantized_engine(self.backend):
            for name, inputs, fn in self.steps:
                result = fn(*(values[i] for i in inputs)) if inputs else fn(x)
                values[name] = result
        return result


def depthwise_backend(backend: str, exact_depthwise: bool = True) -> str:
    """The backend whose kernel runs depthwise convolutions for ``backend``."""
    if exact_depthwise and backend in SATURATING_DEPTHWISE and "qnnpack" in torch.backends.quantized.supported_engines:
        return "qnnpack"
    return backend


def depthwise_kernels(backend: str, exact_depthwise: bool = True) -> str:
    """Which kernel runs depthwise convolutions for ``backend``: a backend name, with the reason appended when
    it is a saturating one (``"fbgemm (saturating 16-bit sums: qnnpack not in this PyTorch build)"``)."""
    kernels = depthwise_backend(backend, exact_depthwise)
    if kernels not in SATURATING_DEPTHWISE:
        return kernels
    why = "exact_depthwise=False" if not exact_depthwise else "qnnpack not in this PyTorch build"
    where = "" if kernels == "fbgemm" else " where x86 picks fbgemm's kernel"  # x86 may pick oneDNN's instead
    return f"{kernels} (saturating 16-bit sums{where}: {why})"


def status_note(backend: str, exact_depthwise: bool = True) -> str | None:
    """One line for the record when depthwise convolutions run on a saturating kernel, else ``None``."""
    kernels = depthwise_backend(backend, exact_depthwise)
    if kernels not in SATURATING_DEPTHWISE:
        return None
    why = ("exact_depthwise=False was asked for" if not exact_depthwise
           else "qnnpack, whose kernel is exact, is not in this PyTorch build "
                f"(supported engines: {', '.join(torch.backends.quantized.supported_engines)})")
    which = ("fbgemm's kernel, which sums" if kernels == "fbgemm"
             else "the x86 backend's kernels; fbgemm's, which x86 picks on some hosts and layers, sum")
    return (f"depthwise convolutions run on {which} in saturating 16-bit arithmetic (off by up to tens of output "
            f"LSB against the integer reference): {why}")


def elementwise_kernels(backend: str) -> str:
    """How MobileNet v3's hardswish, hardsigmoid and squeeze-excite product run on ``backend``, for the record:
    which steps are float arithmetic inside or between torch's quantized kernels."""
    hardswish = ("QNNPACK's hardswish operator" if backend == "qnnpack" else
                 "dequantizes, applies hardswish and requantizes in float per element inside the kernel")
    return (f"hardswish: quantized::hardswish ({hardswish}); hardsigmoid: in float between dequantize and "
            "quantize_per_tensor (aten's quantized hardsigmoid writes a fixed (1/256, 0) grid, and rounding twice "
            "moved 44% of a MobileNet v3's gate codes by 1 LSB); mul: quantized::mul (integer product, float "
            "output multiplier)")


def build(model: IntModel, backend: str = "x86", exact_depthwise: bool = True) -> TorchNativeModel:
    """The engine adapter's entry point."""
    return TorchNativeModel(model, backend, exact_depthwise)


def engine_info(backend: str = "x86", exact_depthwise: bool = True) -> dict[str, str]:
    """The engine's identity for records: name, PyTorch version, which kernels run depthwise convolutions and,
    when those saturate, a ``status_note`` saying why."""
    info = {"engine": f"torch_native_{backend}", "engine_version": torch.__version__.split("+")[0],
            "depthwise_kernels": depthwise_kernels(backend, exact_depthwise),
            "elementwise_kernels": elementwise_kernels(backend)}
    note = status_note(backend, exact_depthwise)
    return info if note is None else {**info, "status_note": note}
