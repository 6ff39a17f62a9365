"""Adapter: ONNX Runtime running a QDQ model built directly from the canonical integer model.

Every integer op of the :class:`IntModel` becomes the QDQ ("quantize-dequantize") pattern of the ONNX
quantization convention: ``DequantizeLinear`` of each int8/uint8 input, of the int8 weight initializer (per
channel, axis 0) and of the int32 bias (scale S_in·S_w, Jacob §2.4), the float op, then ``QuantizeLinear`` to the
output's (S, Z) (Jacob eq. 1). ONNX Runtime's graph optimizer fuses each group into one integer kernel
(QLinearConv, QGemm/QLinearMatMul, QLinearAdd, QLinearGlobalAveragePool, QLinearConcat), so the int8 kernels
really run; ``tests/test_engine_onnxruntime.py`` checks the optimized graph.

Fused activations are the integer clamp of Jacob §2.4, applied as an integer ``Clip`` on the quantized output only
when [clamp_min, clamp_max] is narrower than the 8-bit container (e.g. ReLU6 below the grid's top, or a grid
narrower than 8 bits, which runs in an 8-bit container: ``emulated_bits``). Max-pool and flatten run directly on
the integer tensor (same grid in and out). ORT requantizes with a float multiplier instead of the fixed-point
(M0, n) of Jacob eq. 6, so outputs may differ from the integer reference by one LSB now and then.

MobileNet v3's ops are exported the same way: ``HardSwish``, ``HardSigmoid`` (alpha 1/6, beta 1/2) and ``Mul``
(the broadcast squeeze-excite product) between DequantizeLinear and QuantizeLinear. ORT 1.32's CPU provider
fuses the Mul into its integer QLinearMul on uint8 grids only (on int8 grids it stays a float Mul); it has no
integer hardswish/hardsigmoid kernel, so those run in float between the DQ/Q pair (HardSwish expanded by ORT into
HardSigmoid and Mul; ONNX's HardSigmoid computes alpha·x + beta, not torch's (x + 3)/6, so a code may move by one
LSB at a rounding tie). :func:`elementwise_execution` reads this from ORT's optimized graph and
:func:`engine_info` records it, so a float step is never hidden.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qat.errors import QatError
from qat.intmodel.elementwise import squeeze_excite_probe
from qat.intmodel.graph import IntModel, IntNode, TensorQ

# The onnxruntime adapter of qat.compat: the only module using its private API (the exception types of
# onnxruntime.capi.onnxruntime_pybind11_state), checked against this version (constraints.txt pins it).
CHECKED_AGAINST = {"onnxruntime": "1.32.0"}
OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ERROR_KEY = "latency.engine"
_CONTAINERS = {  # signed grid? -> (ONNX element type, numpy dtype, lowest, highest)
    False: (TensorProto.UINT8, np.uint8, 0, 255),
    True: (TensorProto.INT8, np.int8, -128, 127),
}


ELEMENTWISE_OPS = ("hardswish", "hardsigmoid", "mul")  # MobileNet v3's ops: ORT fuses some, not all


def engine_info() -> dict[str, str]:
    """Name and version of this engine, and how it runs MobileNet v3's elementwise ops (read from the optimized
    graph of a probe model, :func:`elementwise_kernels`), for records."""
    return {"engine": "onnxruntime", "engine_version": ort.__version__, "elementwise_kernels": elementwise_kernels()}


def _container(q: TensorQ, where: str) -> tuple[int, type, int, int]:
    """The 8-bit container of an activation grid; grids that do not fit are refused (no float fallback)."""
    elem, dtype, low, high = _CONTAINERS[q.signed]
    if q.qmin < low or q.qmax > high:
        raise QatError(ERROR_KEY, f"{where}: {q.bits}-bit {'signed' if q.signed else 'unsigned'} activations do "
                       "not fit the 8-bit kernels of onnxruntime", "use activations of 8 bits or fewer on onnxruntime")
    return elem, dtype, low, high


class _QdqGraph:
    """Accumulates ONNX nodes and initializers while walking the integer model in order."""

    def __init__(self, model: IntModel) -> None:
        self.model = model
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.qparams: dict[str, TensorQ] = {}  # quantized tensor name -> its grid
        self.spatial: dict[str, tuple[int, int]] = {}  # quantized tensor name -> (H, W) where known
        self.qparam_names: dict[str, tuple[str, str]] = {}  # quantized tensor name -> its scale, zero-point consts

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # 0-d stays 0-d
        return name

    def add(self, op: str, inputs: Sequence[str], output: str, name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output

    def qparam_consts(self, tensor: str, q: TensorQ) -> tuple[str, str]:
        """Scale and zero-point initializers of a quantized tensor (one pair per tensor, shared by its users)."""
        if tensor not in self.qparam_names:
            _, dtype, _, _ = _container(q, tensor)
            self.qparam_names[tensor] = (self.const(f"{tensor}/scale", np.array(q.scale, dtype=np.float32)),
                                         self.const(f"{tensor}/zero_point", np.array(q.zero_point, dtype=dtype)))
        return self.qparam_names[tensor]

    def dequantize(self, tensor: str, consumer: str) -> str:
        scale, zero_point = self.qparam_consts(tensor, self.qparams[tensor])
        return self.add("DequantizeLinear", [tensor, scale, zero_point], f"{consumer}/dq/{tensor}",
                        f"{consumer}/dq/{tensor}")

    def quantize(self, real: str, node: IntNode, low: int | None = None, high: int | None = None) -> str:
        """QuantizeLinear to the node's grid, then the integer clamp when narrower than the container."""
        q = node.out
        assert q is not None
        _, dtype, c_low, c_high = _container(q, node.name)
        low = q.qmin if low is None else max(low, q.qmin)
        high = q.qmax if high is None else min(high, q.qmax)
        scale, zero_point = self.qparam_consts(node.name, q)
        clamp = low > c_low or high < c_high
        quantized = f"{node.name}/q" if clamp else node.name
        self.add("QuantizeLinear", [real, scale, zero_point], quantized, f"{node.name}/quantize")
        if clamp:  # Jacob §2.4: the fused activation is a clamp of the output's integer range
            self.add("Clip", [quantized, self.const(f"{node.name}/clamp_min", np.array(low, dtype=dtype)),
                              self.const(f"{node.name}/clamp_max", np.array(high, dtype=dtype))],
                     node.name, f"{node.name}/clamp")
        self.qparams[node.name] = q
        return node.name

    def weights(self, node: IntNode) -> tuple[str, str]:
        """DequantizeLinear of the int8 weight (per channel, axis 0) and of the int32 bias (scale S_in·S_w)."""
        w = node.tensors["weight"]
        if int(node.attrs["weight_bits"]) > 8 or w.min() < -128 or w.max() > 127:
            raise QatError(ERROR_KEY, f"{node.name}: {node.attrs['weight_bits']}-bit weights do not fit the int8 "
                           "kernels of onnxruntime", "use weights of 8 bits or fewer on onnxruntime")
        per_channel = bool(node.attrs["weight_per_channel"])
        w_scale = node.tensors["weight_scale"].float().numpy()
        w_zp = node.tensors["weight_zero_point"].numpy().astype(np.int8)
        b_scale = node.tensors["bias_scale"].float().numpy()
        axis: dict[str, int] = {"axis": 0} if per_channel else {}
        if not per_channel:
            w_scale, w_zp, b_scale = w_scale[:1].reshape(()), w_zp[:1].reshape(()), b_scale[:1].reshape(())
        p = node.name
        weight = self.add("DequantizeLinear", [self.const(f"{p}/weight_q", w.numpy().astype(np.int8)),
                                               self.const(f"{p}/weight_scale", w_scale),
                                               self.const(f"{p}/weight_zero_point", w_zp)],
                          f"{p}/weight", f"{p}/dq/weight", **axis)
        bias_q = node.tensors["bias"].numpy().astype(np.int32)
        bias = self.add("DequantizeLinear", [self.const(f"{p}/bias_q", bias_q),
                                             self.const(f"{p}/bias_scale", b_scale),
                                             self.const(f"{p}/bias_zero_point", np.zeros_like(b_scale, np.int32))],
                        f"{p}/bias", f"{p}/dq/bias", **axis)
        return weight, bias

    def emit(self, node: IntNode) -> None:
        handler = getattr(self, f"_op_{node.op}", None)
        if handler is None:
            raise QatError(ERROR_KEY, f"{node.name}: op {node.op!r} is not supported by onnxruntime",
                           "supported ops: quantize, conv2d, linear, add, avg_pool, max_pool, flatten, cat, hardswish, "
                           "hardsigmoid, mul, dequantize")
        handler(node)

    def _op_quantize(self, node: IntNode) -> None:
        self.quantize(INPUT_NAME, node)
        shape = self.model.input_shape
        if len(shape) == 4:
            self.spatial[node.name] = (int(shape[2]), int(shape[3]))

    def _op_dequantize(self, node: IntNode) -> None:
        (src,) = node.inputs
        scale, zero_point = self.qparam_consts(src, self.qparams[src])
        self.add("DequantizeLinear", [src, scale, zero_point], OUTPUT_NAME, f"{node.name}/dequantize")

    def _op_conv2d(self, node: IntNode) -> None:
        a = node.attrs
        x = self.dequantize(node.inputs[0], node.name)
        weight, bias = self.weights(node)
        pads = [int(p) for p in a["padding"]] * 2
        kernel = list(node.tensors["weight"].shape[2:])
        y = self.add("Conv", [x, weight, bias], f"{node.name}/real", node.name, strides=list(a["stride"]),
                     pads=pads, dilations=list(a["dilation"]), group=int(a["groups"]), kernel_shape=kernel)
        self.quantize(y, node, a.get("clamp_min"), a.get("clamp_max"))
        if node.inputs[0] in self.spatial:
            h, w = self.spatial[node.inputs[0]]
            self.spatial[node.name] = tuple(  # type: ignore[assignment]
                (size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, p, d, k, s in zip((h, w), a["padding"], a["dilation"], kernel, a["stride"], strict=True))

    def _op_linear(self, node: IntNode) -> None:
        x = self.dequantize(node.inputs[0], node.name)
        weight, bias = self.weights(node)
        y = self.add("Gemm", [x, weight, bias], f"{node.name}/real", node.name, transB=1)
        self.quantize(y, node, node.attrs.get("clamp_min"), node.attrs.get("clamp_max"))

    def _op_add(self, node: IntNode) -> None:
        a, b = (self.dequantize(i, node.name) for i in node.inputs)
        y = self.add("Add", [a, b], f"{node.name}/real", node.name)
        q = node.out
        assert q is not None
        low = max(q.qmin, q.zero_point) if node.attrs.get("activation") in ("relu", "relu6") else None
        high = min(q.qmax, q.zero_point + round(6.0 / q.scale)) if node.attrs.get("activation") == "relu6" else None
        self.quantize(y, node, low, high)
        if node.inputs[0] in self.spatial:
            self.spatial[node.name] = self.spatial[node.inputs[0]]

    def _op_avg_pool(self, node: IntNode) -> None:
        a = node.attrs
        src = node.inputs[0]
        x = self.dequantize(src, node.name)
        if a["adaptive"]:
            out_size = tuple(int(s) for s in a["output_size"])
            if out_size == (1, 1):
                y = self.add("GlobalAveragePool", [x], f"{node.name}/real", node.name)
            elif src in self.spatial and all(i % o == 0 for i, o in zip(self.spatial[src], out_size, strict=True)):
                kernel = [i // o for i, o in zip(self.spatial[src], out_size, strict=True)]
                y = self.add("AveragePool", [x], f"{node.name}/real", node.name, kernel_shape=kernel, strides=kernel)
            else:
                raise QatError(ERROR_KEY, f"{node.name}: adaptive average pooling to {list(out_size)} from an input "
                               "of unknown or indivisible size is not supported by onnxruntime",
                               "use global average pooling or an output size that divides the input")
            self.spatial[node.name] = out_size  # type: ignore[assignment]
        else:
            kernel, stride, padding = (_pair(a[k]) for k in ("kernel_size", "stride", "padding"))
            stride = stride or kernel
            y = self.add("AveragePool", [x], f"{node.name}/real", node.name, kernel_shape=kernel, strides=stride,
                         pads=padding * 2, count_include_pad=1)  # PyTorch's default count_include_pad=True
            self.spatial.pop(node.name, None)
        self.quantize(y, node)

    def _op_max_pool(self, node: IntNode) -> None:
        a = node.attrs
        kernel, stride, padding, dilation = (_pair(a[k]) for k in ("kernel_size", "stride", "padding", "dilation"))
        # same grid in and out: max-pool is exact on the integer codes, so it runs on them directly
        self.add("MaxPool", [node.inputs[0]], node.name, node.name, kernel_shape=kernel, strides=stride or kernel,
                 pads=padding * 2, dilations=dilation, ceil_mode=int(bool(a["ceil_mode"])))
        self.qparams[node.name] = self.qparams[node.inputs[0]]

    def _op_flatten(self, node: IntNode) -> None:
        if int(node.attrs["start_dim"]) != 1:
            raise QatError(ERROR_KEY, f"{node.name}: flatten from dim {node.attrs['start_dim']} is not supported",
                           "flatten from dim 1 (N, C·H·W)")
        self.add("Flatten", [node.inputs[0]], node.name, node.name, axis=1)
        self.qparams[node.name] = self.qparams[node.inputs[0]]

    def _op_cat(self, node: IntNode) -> None:
        xs = [self.dequantize(i, node.name) for i in node.inputs]
        y = self.add("Concat", xs, f"{node.name}/real", node.name, axis=int(node.attrs["dim"]))
        self.quantize(y, node)

    def _op_hardswish(self, node: IntNode) -> None:
        (src,) = node.inputs
        y = self.add("HardSwish", [self.dequantize(src, node.name)], f"{node.name}/real", node.name)
        self.quantize(y, node)
        self._keep_spatial(node)

    def _op_hardsigmoid(self, node: IntNode) -> None:
        (src,) = node.inputs  # ONNX's HardSigmoid is max(0, min(1, alpha·x + beta)): torch's ReLU6(x + 3)/6
        y = self.add("HardSigmoid", [self.dequantize(src, node.name)], f"{node.name}/real", node.name,
                     alpha=1.0 / 6.0, beta=0.5)
        self.quantize(y, node)
        self._keep_spatial(node)

    def _op_mul(self, node: IntNode) -> None:
        a, b = (self.dequantize(i, node.name) for i in node.inputs)  # broadcasts the (N, C, 1, 1) SE gate
        y = self.add("Mul", [a, b], f"{node.name}/real", node.name)
        self.quantize(y, node, node.attrs.get("clamp_min"), node.attrs.get("clamp_max"))
        sizes = [self.spatial[i] for i in node.inputs if i in self.spatial and self.spatial[i] != (1, 1)]
        if sizes:
            self.spatial[node.name] = sizes[0]

    def _keep_spatial(self, node: IntNode) -> None:
        if node.inputs[0] in self.spatial:
            self.spatial[node.name] = self.spatial[node.inputs[0]]

    def to_model(self) -> onnx.ModelProto:
        n, c, h, w = (self.model.input_shape + [0, 0, 0, 0])[:4]
        dims: list[int | str] = ["batch", int(c), int(h), int(w)]
        graph = helper.make_graph(
            self.nodes, "qat_intmodel_qdq",
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, None)],
            initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qat")
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # also fills the output's shape
        onnx.checker.check_model(model)
        return model


def _pair(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]


def int_model_to_onnx(int_model: IntModel) -> bytes:
    """The serialized QDQ ONNX model of an integer model (float NCHW in, float logits out)."""
    if len(int_model.input_shape) != 4:
        raise QatError(ERROR_KEY, f"input shape {int_model.input_shape} is not NCHW",
                       "convert a model traced with a 4-d example input")
    clash = sorted({n.name for n in int_model.nodes} & {INPUT_NAME, OUTPUT_NAME})
    if clash:
        raise QatError(ERROR_KEY, f"integer-model node names {clash} clash with the ONNX graph's input/output names",
                       "rename those layers of the model")
    graph = _QdqGraph(int_model)
    for node in int_model.nodes:
        graph.emit(node)
    return graph.to_model().SerializeToString()


def float_module_to_onnx(module: nn.Module, example: torch.Tensor) -> bytes:
    """The serialized float ONNX model of ``module`` with BN folded (dynamic batch dimension)."""
    from qat.models.fold import fold_batch_norm

    folded = fold_batch_norm(module).eval()
    if example.shape[0] == 1:  # torch.export specializes a size-1 dimension; trace batch 2 to keep it dynamic
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(folded, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False)
    except Exception as exc:  # the exporter raises many types; name the module and keep the cause
        raise QatError(ERROR_KEY, f"{type(module).__name__} cannot be exported to ONNX: {exc}".splitlines()[0],
                       "use a model torch.export can trace") from exc
    return program.model_proto.SerializeToString()


def session_options(threads: int = 1, optimized_model_path: str | os.PathLike[str] | None = None
                    ) -> ort.SessionOptions:
    """Fixed threads (intra-op ``threads``, inter-op 1, sequential) and full graph optimization (QDQ fusion)."""
    if threads < 1:
        raise QatError("latency.threads", f"{threads} is not a positive thread count", "use 1 or more")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


class OrtModel:
    """A callable ONNX Runtime session: float NCHW tensor in, float logits out; keeps its ONNX bytes."""

    def __init__(self, onnx_bytes: bytes, *, threads: int = 1, emulated_bits: bool = False,
                 optimized_model_path: str | os.PathLike[str] | None = None) -> None:
        self.onnx_bytes = onnx_bytes
        self.threads = threads
        self.emulated_bits = emulated_bits
        try:
            self.session = ort.InferenceSession(onnx_bytes, session_options(threads, optimized_model_path),
                                                providers=["CPUExecutionProvider"])
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
                ort.capi.onnxruntime_pybind11_state.NotImplemented) as exc:
            raise QatError(ERROR_KEY, f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}",
                           "export the model again with qat") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: array})[0])


def build_int(int_model: IntModel, threads: int = 1,
              optimized_model_path: str | os.PathLike[str] | None = None) -> OrtModel:
    """The int8 engine for an integer model (grids narrower than 8 bits run in 8-bit containers, flagged)."""
    return OrtModel(int_model_to_onnx(int_model), threads=threads, emulated_bits=int_model.min_bits < 8,
                    optimized_model_path=optimized_model_path)


def build_float(module: nn.Module, example: torch.Tensor, threads: int = 1) -> OrtModel:
    """The float engine for a float module (BN folded first, as any deployment does)."""
    return OrtModel(float_module_to_onnx(module, example), threads=threads)


def load(source: bytes | str | os.PathLike[str], threads: int = 1) -> OrtModel:
    """An engine from ONNX bytes or a .onnx file (e.g. one written by :mod:`qat.export`)."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return OrtModel(data, threads=threads)


# --------------------------------------------------------------------------------------------------------------
# how ORT runs MobileNet v3's elementwise ops, read back from its optimized graph
# --------------------------------------------------------------------------------------------------------------


def optimized_graph(onnx_bytes: bytes) -> onnx.ModelProto:
    """The graph ORT runs for ``onnx_bytes`` after its full graph optimization (written by the session to
    ``SessionOptions.optimized_model_filepath`` and read back)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "optimized.onnx")
        OrtModel(onnx_bytes, optimized_model_path=path)
        return onnx.load(str(path))


def _float_ops_before(optimized: onnx.ModelProto, quantize: onnx.NodeProto) -> list[str]:
    """The float op types between a QuantizeLinear and the DequantizeLinears feeding it, in graph order."""
    producer = {out: n for n in optimized.graph.node for out in n.output}
    found: set[int] = set()
    stack = [quantize.input[0]]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.op_type == "DequantizeLinear" or id(node) in found:
            continue
        found.add(id(node))
        stack.extend(node.input)
    return [n.op_type for n in optimized.graph.node if id(n) in found]


def elementwise_execution(int_model: IntModel, optimized: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Per MobileNet v3 op kind (hardswish, hardsigmoid, mul) of ``int_model``: how ORT's ``optimized`` graph runs
    its nodes, counted. ``integer QLinearMul`` where a fused kernel (named after the layer) replaced the DQ/op/Q
    group; ``float HardSigmoid, Mul between DequantizeLinear and QuantizeLinear`` where the layer's QuantizeLinear
    is still there, with the float ops ORT runs before it."""
    by_name = {n.name: n for n in optimized.graph.node}
    record: dict[str, dict[str, int]] = {}
    for node in int_model.nodes:
        if node.op not in ELEMENTWISE_OPS:
            continue
        quantize = by_name.get(f"{node.name}/quantize")
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            floats = ", ".join(_float_ops_before(optimized, quantize))
            how = f"float {floats} between DequantizeLinear and QuantizeLinear"
        elif node.name in by_name and by_name[node.name].op_type.startswith("QLinear"):
            how = f"integer {by_name[node.name].op_type}"
        else:
            raise QatError(ERROR_KEY, f"{node.name}: neither its QuantizeLinear nor a fused integer kernel is in the "
                           "graph onnxruntime optimized", "report this model and onnxruntime version")
        kinds = record.setdefault(node.op, {})
        kinds[how] = kinds.get(how, 0) + 1
    return record


@functools.cache
def elementwise_kernels() -> str:
    """How this ORT runs hardswish, hardsigmoid and the SE mul, read from the optimized graph of a probe
    squeeze-excite block on uint8 and on int8 grids (one line for the record)."""
    parts = []
    for op in ELEMENTWISE_OPS:
        ways = {}
        for signed in (False, True):
            probe = squeeze_excite_probe(signed)
            (ways[signed],) = elementwise_execution(probe, optimized_graph(int_model_to_onnx(probe)))[op]
        same = ways[False] == ways[True]
        parts.append(f"{op}: {ways[False]}" if same else f"{op}: {ways[False]} on uint8 grids, {ways[True]} on int8 "
                     "grids")
    return "; ".join(parts)
