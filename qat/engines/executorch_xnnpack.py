"""Adapter: ExecuTorch (PyTorch's on-device runtime) with the XNNPACK delegate, int8 and float.

The integer path rebuilds the canonical :class:`IntModel` as PT2E's *quantized reference representation*
(``dequantize_per_tensor -> conv2d(dequantize_per_channel(int8 W), float bias) -> [relu/hardtanh] ->
quantize_per_tensor``, the pattern ``convert_pt2e`` produces), exports it with ``torch.export``, lowers it
with ``to_edge_transform_and_lower`` + ``XnnpackPartitioner`` restricted to static int8 quantization, and
loads the ``.pte`` program in the ExecuTorch C++ runtime. Every op must end up inside an XNNPACK delegate:
anything left behind (which would run in float or in ExecuTorch's portable kernels) is a :class:`QatError`
naming the layer, never a silent fallback.

Integers: XNNPACK runs asymmetric int8 activations (qs8) and symmetric int8 weights (qc8w per channel,
qs8 per tensor). Unsigned activation grids are shifted by -128 (same scale, Z - 128), which is exact
(r = S(q - Z) = S((q - 128) - (Z - 128))). Grids narrower than 8 bits run in 8-bit containers
(``emulated_bits``); conv/linear outputs are clamped to the narrow grid by the fused output clamp (Jacob
§2.4), other ops saturate at the container like torch_native. The int32 bias is handed over as the float
``bias_int · S_in·S_w``; XNNPACK re-quantizes it with scale S_in·S_w (exact up to fp32 rounding) and
requantizes accumulators with an fp32 multiplier rather than the (M0, n) pair of Jacob eq. 5-6.

MobileNet v3: the squeeze-excite product runs on XNNPACK's int8 multiply (broadcast gate); hardswish on its fp32
kernel between its int8->fp32 and fp32->int8 converts, as ExecuTorch's own partitioner (1.5.1) admits it: fp32 only
(:func:`_partitioner`). XNNPACK's int8 hardswish (``qs8-vhswish``, which an earlier revision forced with a config
subclass) approximates it in Q15 fixed point and moved codes by one against the integer model's table (96.8% top-1
agreement on the demo's v3-small); fp32 rounded once is the table. XNNPACK has no hardsigmoid: it is written as
torch's arithmetic, min(max(x + 3, 0), 6) / 6, which the delegate runs in fp32 (an add with a fused clamp, a
divide) between the same converts. These are the only fp32 nodes a lowering may contain
(:func:`_check_float_nodes`), and :func:`elementwise_execution` / ``engine_info`` record how each op runs, read back
from the lowered program.

Threads: ExecuTorch has one process-wide pthreadpool, which XNNPACK captures when a program is loaded.
``threads`` resizes it (``_unsafe_reset_threadpool``); a program whose pool was resized afterwards by another
program is reloaded from its bytes before it runs again, so each callable always runs on its own thread count.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.compat.torch_private import quantized_decomposed_ops
from qat.errors import QatError
from qat.intmodel.elementwise import squeeze_excite_probe
from qat.intmodel.graph import IntModel, IntNode, TensorQ

# The executorch adapter of qat.compat: the only module using its private API (portable_lib's underscored
# runtime functions, exir._serialize, the XNNPACK delegate's serialization, the partitioner's per-op configs),
# checked against this version (constraints.txt pins it).
CHECKED_AGAINST = {"executorch": "1.5.1"}
ENGINE = "executorch_xnnpack"
INT8_MIN, INT8_MAX = -128, 127
_QD = quantized_decomposed_ops()
# ops that may stay outside the delegate: plumbing of the ExecuTorch program, no arithmetic
_PLUMBING = {"getitem", "executorch_call_delegate"}


def engine_info() -> dict[str, str]:
    """Engine name, the installed ExecuTorch version and how it runs MobileNet v3's elementwise ops (read from a
    lowered probe program, :func:`elementwise_kernels`), recorded with every result."""
    from executorch.version import __version__

    return {"engine": ENGINE, "engine_version": __version__.split("+")[0],
            "elementwise_kernels": elementwise_kernels()}


# --------------------------------------------------------------------------------------------------------------
# IntModel -> PT2E quantized reference representation
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """An activation grid in the int8 container: r = scale · (q - zero_point), q in [qmin, qmax] ⊆ [-128, 127]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def narrow(self) -> bool:
        return self.qmin > INT8_MIN or self.qmax < INT8_MAX

    def real(self, q: int) -> float:
        return (q - self.zero_point) * self.scale


def _int8_grid(q: TensorQ, layer: str) -> _Grid:
    """The int8 container of a grid: unsigned grids shift by -128 (exact); wider than 8 bits is an error."""
    shift = 0 if q.signed else -128
    grid = _Grid(q.scale, q.zero_point + shift, q.qmin + shift, q.qmax + shift)
    if grid.qmin < INT8_MIN or grid.qmax > INT8_MAX:
        raise QatError("engine", f"{layer}: {q.bits}-bit activations do not fit XNNPACK's int8 kernels "
                       f"of {ENGINE}", "use activations of 8 bits or fewer on this engine")
    return grid


def _check_weights(node: IntNode) -> None:
    w, zp = node.tensors["weight"], node.tensors["weight_zero_point"]
    if int(w.min()) < INT8_MIN or int(w.max()) > INT8_MAX:
        raise QatError("engine", f"{node.name}: {node.attrs['weight_bits']}-bit weights do not fit int8 kernels",
                       f"use weights of 8 bits or fewer on {ENGINE}")
    if bool((zp != 0).any()):
        raise QatError("engine", f"{node.name}: XNNPACK needs symmetric weights (zero point 0)",
                       "set quant.weight_symmetric=true for this engine")


class _Step(nn.Module):
    """One IntNode as float ops between int8 quantize/dequantize (int8 tensors flow between steps)."""

    def __init__(self, node: IntNode, in_grids: list[_Grid], out_grid: _Grid | None) -> None:
        super().__init__()
        self.layer, self.op, self.attrs = node.name, node.op, dict(node.attrs)
        self.in_grids, self.out_grid = in_grids, out_grid
        self.clamp: tuple[float, float] | None = None  # real bounds of a fused output clamp
        self.relu = False
        if node.op in ("conv2d", "linear"):
            _check_weights(node)
            self._weights(node)
            self._fused_clamp(node)
        elif node.op == "add":
            self.relu = node.attrs.get("activation", "none") == "relu"
        elif node.op == "avg_pool" and not (node.attrs["adaptive"] and list(node.attrs["output_size"]) == [1, 1]):
            raise QatError("engine", f"{node.name}: XNNPACK has int8 average pooling only as a global mean",
                           f"use adaptive average pooling to 1x1 on {ENGINE}")
        elif node.op == "cat" and len(node.inputs) < 2:
            raise QatError("engine", f"{node.name}: XNNPACK concatenates 2 or more tensors", "")
        elif node.op not in ("quantize", "dequantize", "avg_pool", "max_pool", "flatten", "cat", "hardswish",
                             "hardsigmoid", "mul"):
            raise QatError("engine", f"op {node.op!r} of {node.name} is not supported by {ENGINE}", "")
        # ops without a fused clamp re-clamp a narrow (<8-bit) output grid in a separate int8 clamp (the int8
        # container's quantize clamps to [-128, 127] only): the input's quantize too, whose codes leave a narrow
        # grid wherever the image leaves its range (a learned or clipped input step)
        self.grid_clamp = out_grid is not None and out_grid.narrow and node.op in (
            "quantize", "add", "avg_pool", "cat", "hardswish", "hardsigmoid", "mul")

    def _weights(self, node: IntNode) -> None:
        w = node.tensors["weight"].to(torch.int8)
        self.per_channel = bool(node.attrs["weight_per_channel"])
        self.weight_qmin, self.weight_qmax = int(node.attrs["weight_qmin"]), int(node.attrs["weight_qmax"])
        self.register_buffer("weight", w)
        self.register_buffer("weight_scale", node.tensors["weight_scale"].float().clone())
        self.register_buffer("weight_zero_point", node.tensors["weight_zero_point"].long().clone())
        self.tensor_scale = float(node.tensors["weight_scale"].reshape(-1)[0])
        bias = node.tensors["bias"].double() * node.tensors["bias_scale"].double()
        self.register_buffer("bias", bias.float())

    def _fused_clamp(self, node: IntNode) -> None:
        """Fused ReLU/ReLU6 and narrow grids are one output clamp (Jacob §2.4), in the int8 container."""
        assert self.out_grid is not None and node.out is not None
        shift = self.out_grid.zero_point - node.out.zero_point
        low = max(int(node.attrs.get("clamp_min", node.out.qmin)) + shift, INT8_MIN)
        high = min(int(node.attrs.get("clamp_max", node.out.qmax)) + shift, INT8_MAX)
        if low == INT8_MIN and high == INT8_MAX:
            return
        if high == INT8_MAX and low == self.out_grid.zero_point:
            self.relu = True
            return
        self.clamp = (self.out_grid.real(low), self.out_grid.real(high))

    def _dequantize_weight(self) -> torch.Tensor:
        if self.per_channel:
            return _QD.dequantize_per_channel(self.weight, self.weight_scale, self.weight_zero_point, 0,
                                              self.weight_qmin, self.weight_qmax, torch.int8)
        return _QD.dequantize_per_tensor(self.weight, self.tensor_scale, 0, self.weight_qmin,
                                         self.weight_qmax, torch.int8)

    @staticmethod
    def _dq(x: torch.Tensor, g: _Grid) -> torch.Tensor:
        return _QD.dequantize_per_tensor(x, g.scale, g.zero_point, INT8_MIN, INT8_MAX, torch.int8)

    @staticmethod
    def _q(x: torch.Tensor, g: _Grid) -> torch.Tensor:
        return _QD.quantize_per_tensor(x, g.scale, g.zero_point, INT8_MIN, INT8_MAX, torch.int8)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.op == "quantize":
            y = self._q(xs[0], self.out_grid)
        else:
            reals = [self._dq(x, g) for x, g in zip(xs, self.in_grids, strict=True)]
            if self.op == "dequantize":
                return reals[0]
            y = self._compute(reals)
            if self.relu:
                y = F.relu(y)
            elif self.clamp is not None:
                y = F.hardtanh(y, self.clamp[0], self.clamp[1])
            y = self._q(y, self.out_grid)
        if self.grid_clamp:
            g = self.out_grid
            y = self._q(F.hardtanh(self._dq(y, g), g.real(g.qmin), g.real(g.qmax)), g)
        return y

    def _compute(self, xs: list[torch.Tensor]) -> torch.Tensor:
        a = self.attrs
        if self.op == "conv2d":
            return F.conv2d(xs[0], self._dequantize_weight(), self.bias, a["stride"], a["padding"], a["dilation"],
                            a["groups"])
        if self.op == "linear":
            return F.linear(xs[0], self._dequantize_weight(), self.bias)
        if self.op == "add":
            return xs[0] + xs[1]
        if self.op == "avg_pool":
            return xs[0].mean((2, 3), keepdim=True)
        if self.op == "max_pool":
            return F.max_pool2d(xs[0], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
        if self.op == "flatten":
            return torch.flatten(xs[0], a["start_dim"])
        if self.op == "hardswish":
            return F.hardswish(xs[0])
        if self.op == "hardsigmoid":  # torch's own arithmetic (min(max(x + 3, 0), 6) / 6) with float constants,
            return F.hardtanh(xs[0] + 3.0, 0.0, 6.0) / 6.0  # which XNNPACK runs in fp32: it has no hardsigmoid
        if self.op == "mul":
            return xs[0] * xs[1]
        return torch.cat(xs, a["dim"])


class QdqReference(nn.Module):
    """The IntModel as one PT2E-style Q/DQ module: float NCHW in, float logits out, int8 between ops.

    With ``probe=True`` it also returns every layer's output (dequantized, in node order) after the logits, so
    one lowered program exposes each layer's int8 codes (for layer-by-layer comparison between engines).
    """

    def __init__(self, model: IntModel, probe: bool = False) -> None:
        super().__init__()
        self.probe = probe
        grids: dict[str, _Grid] = {}
        self.names: list[str] = []
        self.inputs: list[list[str]] = []
        steps = []
        for node in model.nodes:
            out = _int8_grid(node.out, node.name) if node.out is not None else None
            steps.append(_Step(node, [grids[i] for i in node.inputs], out))
            if out is not None:
                grids[node.name] = out
            self.names.append(node.name)
            self.inputs.append(list(node.inputs))
        self.steps = nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values: dict[str, torch.Tensor] = {}
        result = x
        for name, inputs, step in zip(self.names, self.inputs, self.steps, strict=True):
            result = step(*(values[i] for i in inputs)) if inputs else step(x)
            values[name] = result
        if not self.probe:
            return result
        layers = [step._dq(values[name], step.out_grid) for name, step in zip(self.names, self.steps, strict=True)
                  if step.out_grid is not None]
        return (result, *layers)

    def probed_layers(self) -> list[tuple[str, _Grid]]:
        """Names and int8 grids of the layers a probe program returns after the logits, in order."""
        return [(name, step.out_grid) for name, step in zip(self.names, self.steps, strict=True)
                if step.out_grid is not None]


# --------------------------------------------------------------------------------------------------------------
# lowering to XNNPACK and the .pte program
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Lowered:
    """A lowered program: its bytes, what the XNNPACK delegates took, and which XNNPACK kernels they run."""

    pte: bytes
    delegated_ops: dict[str, int] = field(default_factory=dict)  # edge op -> count inside XNNPACK delegates
    delegates: int = 0
    xnn_nodes: dict[str, int] = field(default_factory=dict)  # "XNNConv2d(qint8,qcint8->qint8)" -> count

    def gemms(self, datatype: str) -> int:
        """XNNPACK convolutions / fully-connected nodes whose activations are ``datatype`` (qint8, fp32)."""
        return sum(count for key, count in self.xnn_nodes.items()
                   if key.split("(")[0] in _XNN_GEMMS and key.endswith(f"->{datatype})"))


_XNN_GEMMS = ("XNNConv2d", "XNNDepthwiseConv2d", "XNNFullyConnected")


def _xnn_graph(processed: bytes) -> dict[str, Any]:
    """Decode an XNNPACK delegate payload (header + flatbuffer XNNGraph) with ExecuTorch's bundled flatc."""
    import json
    import re
    import tempfile

    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader, _get_schema_bytes
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    header = XNNHeader.from_bytes(processed[:XNNHeader.EXPECTED_LENGTH])
    flatbuffer = processed[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
    with tempfile.TemporaryDirectory() as folder:
        schema, data = Path(folder, "schema.fbs"), Path(folder, "graph.bin")
        schema.write_bytes(_get_schema_bytes())
        data.write_bytes(flatbuffer)
        _flatc_decompile(folder, str(schema), str(data))
        text = Path(folder, "graph.json").read_text()
    return json.loads(re.sub(r":\s*(-?)inf\b", r': "\1inf"', text))


def _xnn_node_kinds(graph: dict[str, Any]) -> dict[str, int]:
    """Count XNNPACK nodes by kind and datatypes, e.g. ``XNNConv2d(qint8,qcint8->qint8)``."""
    def datatype(value_id: int) -> str:
        value = graph["xvalues"][value_id]["xvalue_union"]
        value = value.get("tensor_value", value)
        return value["datatype"].removeprefix("xnn_datatype_")

    kinds: dict[str, int] = {}
    for node in graph["xnodes"]:
        fields = node["xnode_union"]
        inputs = [datatype(fields[k]) for k in ("input1_id", "filter_id", "input_id", "input2_id") if k in fields]
        key = f"{node['xnode_union_type']}({','.join(inputs)}->{datatype(fields['output_id'])})" \
            if "output_id" in fields else node["xnode_union_type"]
        kinds[key] = kinds.get(key, 0) + 1
    return kinds


def _op_name(node: torch.fx.Node) -> str:
    """``aten.convolution``, ``quantized_decomposed.quantize_per_tensor``, ``executorch_call_delegate``..."""
    name = getattr(node.target, "__name__", str(node.target))
    return name.removesuffix(".default")


def _layer_of(node: torch.fx.Node, names: list[str] | None) -> str:
    """The IntModel layer (or float module path) a graph node came from, for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        parts = path.split(".")
        if names is not None and len(parts) >= 2 and parts[-2] == "steps" and parts[-1].isdigit():
            return names[int(parts[-1])]
        if names is None and path:
            return path
    return node.name


def _partitioner(quantized: bool) -> Any:
    """ExecuTorch's own XNNPACK partitioner, unmodified: fp32 configs for float models; for integer models the
    static-quantization configs and the fp32 ones, which take hardswish and the decomposed hardsigmoid in fp32
    between XNNPACK's int8<->fp32 converts (:func:`_check_float_nodes` admits exactly those)."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if not quantized:
        return XnnpackPartitioner(config_precisions=ConfigPrecisionType.FP32)
    return XnnpackPartitioner(config_precisions=[ConfigPrecisionType.STATIC_QUANT, ConfigPrecisionType.FP32])


def _lower(module: nn.Module, example: torch.Tensor, quantized: bool, names: list[str] | None) -> Lowered:
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.lowered_backend_module import get_lowered_submodules

    with torch.no_grad():
        exported = torch.export.export(module.eval(), (example,), strict=False)
    edge = to_edge_transform_and_lower(exported, partitioner=[_partitioner(quantized)])
    graph_module = edge.exported_program().graph_module
    left = [n for n in graph_module.graph.nodes if n.op == "call_function" and _op_name(n) not in _PLUMBING]
    if left:
        where = ", ".join(sorted({f"{_layer_of(n, names)} ({_op_name(n)})" for n in left}))
        kind = "int8" if quantized else "float"
        raise QatError("engine", f"{where}: not delegated to XNNPACK's {kind} kernels by {ENGINE}",
                       "restructure these layers or use another engine (no silent fallback to portable kernels)")
    delegated: dict[str, int] = {}
    xnn_nodes: dict[str, int] = {}
    lowered = get_lowered_submodules(graph_module)
    for _, submodule, _ in lowered:
        for n in submodule.original_module.graph.nodes:
            if n.op == "call_function":
                delegated[_op_name(n)] = delegated.get(_op_name(n), 0) + 1
        for key, count in _xnn_node_kinds(_xnn_graph(submodule.processed_bytes)).items():
            xnn_nodes[key] = xnn_nodes.get(key, 0) + count
    program = edge.to_executorch()
    return Lowered(pte=bytes(program.buffer), delegated_ops=delegated, delegates=len(lowered), xnn_nodes=xnn_nodes)


def lower_int(int_model: IntModel, probe: bool = False) -> Lowered:
    """Lower the integer model to XNNPACK's int8 kernels (static quantization only); see QdqReference."""
    example = torch.zeros(int_model.input_shape or [1, 3, 224, 224])
    reference = QdqReference(int_model, probe=probe)
    lowered = _lower(reference, example, quantized=True, names=reference.names)
    expected = sum(1 for n in int_model.nodes if n.op in ("conv2d", "linear"))
    if lowered.gemms("qint8") != expected or lowered.gemms("fp32"):
        raise QatError("engine", f"XNNPACK runs {lowered.gemms('qint8')} of the {expected} conv/linear layers on "
                       f"int8 kernels ({lowered.gemms('fp32')} in fp32): {lowered.xnn_nodes}",
                       "report this model; int8 must not run in float")
    _check_float_nodes(int_model, lowered)
    return lowered


# XNNPACK's fp32 nodes per layer of these ops: hardswish is its fp32 kernel; hardsigmoid, min(max(x + 3, 0), 6) / 6
# (XNNPACK has none), an add with the clamp fused as its output range, and a divide
_FP32_NODES = {"hardswish": {"XNNHardswish(fp32->fp32)": 1},
               "hardsigmoid": {"XNNAdd(fp32,fp32->fp32)": 1, "XNNDiv(fp32,fp32->fp32)": 1}}
_INT8_KERNELS = {"mul": "XNNMultiply(qint8,qint8->qint8)"}
_ELEMENTWISE = ("hardswish", "hardsigmoid", "mul")


def _float_nodes(lowered: Lowered) -> dict[str, int]:
    """The delegate's fp32 arithmetic nodes (XNNPACK's int8<->fp32 converts aside)."""
    return {k: v for k, v in lowered.xnn_nodes.items() if k.endswith("->fp32)") and not k.startswith("XNNConvert")}


def _elementwise_counts(int_model: IntModel) -> dict[str, int]:
    """How many hardswish, hardsigmoid and mul layers ``int_model`` has."""
    return {op: sum(n.op == op for n in int_model.nodes) for op in _ELEMENTWISE}


def _check_float_nodes(int_model: IntModel, lowered: Lowered) -> None:
    """fp32 inside the delegate only as hardswish and the hardsigmoid decomposition, and each mul on XNNPACK's int8
    kernel; anything else is a QatError naming the nodes (never a silent fp32 op)."""
    count = _elementwise_counts(int_model)
    expected: dict[str, int] = {}
    for op, nodes in _FP32_NODES.items():
        if count[op]:
            for kind, n in nodes.items():
                expected[kind] = expected.get(kind, 0) + n * count[op]
    floats = _float_nodes(lowered)
    int8 = {op: lowered.xnn_nodes.get(kind, 0) for op, kind in _INT8_KERNELS.items()}
    if floats != expected or int8 != {op: count[op] for op in _INT8_KERNELS}:
        raise QatError("engine", f"XNNPACK runs fp32 nodes {floats} where only {expected} (the {count['hardswish']} "
                       f"hardswish and {count['hardsigmoid']} hardsigmoid layers) may be fp32, or int8 mul {int8} for "
                       f"{count['mul']} layers", "report this model and ExecuTorch version; int8 must not run in float")


def elementwise_execution(int_model: IntModel, lowered: Lowered) -> dict[str, str]:
    """How the lowered program runs ``int_model``'s hardswish, hardsigmoid and mul layers (those it has), read
    from the XNNPACK nodes of its delegates; :func:`lower_int` has checked that nothing else runs in fp32."""
    count = _elementwise_counts(int_model)
    record = {op: f"delegated to XNNPACK's int8 kernel {_INT8_KERNELS[op]}" for op in _INT8_KERNELS if count[op]}
    converts = "between XNNPACK's int8->fp32 and fp32->int8 converts"
    if count["hardswish"]:
        record["hardswish"] = (f"delegated to XNNPACK in fp32 (XNNHardswish(fp32->fp32), ExecuTorch's partitioner "
                               f"admits hardswish in fp32 only) {converts}")
    if count["hardsigmoid"]:
        kinds = ", ".join(_FP32_NODES["hardsigmoid"])
        record["hardsigmoid"] = (f"delegated to XNNPACK in fp32 ({kinds}: torch's hardsigmoid arithmetic, x + 3 "
                                 f"clamped to [0, 6] as the add's output range, / 6) {converts}")
    return record


@functools.cache
def elementwise_kernels() -> str:
    """How this ExecuTorch runs hardswish, hardsigmoid and the SE mul, read from the lowered program of a probe
    squeeze-excite block (one line for the record); none runs in ExecuTorch's portable kernels."""
    probe = squeeze_excite_probe(signed=True)
    record = elementwise_execution(probe, lower_int(probe))
    return "; ".join(f"{op}: {record[op]}" for op in _ELEMENTWISE) + \
        "; nothing in portable kernels"


def lower_float(module: nn.Module, example: torch.Tensor) -> Lowered:
    """Lower a float model, batch norm folded first (qat.models.fold), to XNNPACK's fp32 kernels."""
    from qat.models.fold import fold_batch_norm

    return _lower(fold_batch_norm(module), example, quantized=False, names=None)


def to_pte_bytes(int_model: IntModel) -> bytes:
    """The ExecuTorch program (.pte) of the integer model."""
    return lower_int(int_model).pte


def to_pte_bytes_float(module: nn.Module, example: torch.Tensor) -> bytes:
    """The ExecuTorch program (.pte) of the float model (BN folded)."""
    return lower_float(module, example).pte


# --------------------------------------------------------------------------------------------------------------
# runtime
# --------------------------------------------------------------------------------------------------------------

_POOL = {"generation": 0}  # bumped whenever this module resizes ExecuTorch's process-wide thread pool


def pool_threads() -> int:
    """The size of ExecuTorch's process-wide thread pool (the one XNNPACK runs on)."""
    from executorch.extension.pybindings import portable_lib

    return int(portable_lib._threadpool_get_thread_count())


def _use_threads(threads: int) -> int:
    """Resize ExecuTorch's process-wide pthreadpool (the one XNNPACK runs on); returns the pool generation."""
    from executorch.extension.pybindings import portable_lib

    if threads < 1:
        raise QatError("latency.threads", f"{threads} threads", "use 1 or more threads")
    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)
        _POOL["generation"] += 1
        if portable_lib._threadpool_get_thread_count() != threads:
            raise QatError("latency.threads", f"ExecuTorch did not resize its thread pool to {threads}", "")
    return _POOL["generation"]


class ExecutorchProgram:
    """A loaded .pte program: float NCHW in, float out (batches larger than the program's are split)."""

    def __init__(self, pte: bytes, threads: int = 1, emulated_bits: bool = False,
                 lowered: Lowered | None = None) -> None:
        self.pte = pte
        self.threads = threads
        self.emulated_bits = emulated_bits
        self.lowered = lowered
        self._load()

    def _load(self) -> None:
        from executorch.extension.pybindings import portable_lib

        if not portable_lib._is_available("XnnpackBackend"):
            raise QatError("engine", "this ExecuTorch build has no XNNPACK backend", "install executorch with XNNPACK")
        self._generation = _use_threads(self.threads)
        self._module = portable_lib._load_for_executorch_from_buffer(self.pte)
        meta = self._module.method_meta("forward")
        self.input_shape = list(meta.input_tensor_meta(0).sizes())

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self._generation != _POOL["generation"]:
            self._load()  # another program resized the pool XNNPACK captured at load time
        if list(x.shape[1:]) != self.input_shape[1:]:
            raise QatError("engine.input", f"input of shape {list(x.shape)}, this program takes "
                           f"{self.input_shape}", "resize the images to the exported resolution")
        batch = self.input_shape[0]
        x = x.detach().float().contiguous()
        outs = []
        for start in range(0, x.shape[0], batch):
            chunk = x[start:start + batch]
            pad = batch - chunk.shape[0]
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros(pad, *chunk.shape[1:])])
            outs.append([out[:batch - pad] if pad else out for out in self._module.forward((chunk,))])
        results = [torch.cat(parts) for parts in zip(*outs, strict=True)]
        return results[0] if len(results) == 1 else tuple(results)


def build_int(int_model: IntModel, threads: int = 1) -> ExecutorchProgram:
    """The integer model on XNNPACK's int8 kernels in the ExecuTorch runtime."""
    lowered = lower_int(int_model)
    return ExecutorchProgram(lowered.pte, threads, emulated_bits=int_model.min_bits < 8, lowered=lowered)


def build_float(module: nn.Module, example: torch.Tensor, threads: int = 1) -> ExecutorchProgram:
    """The float model (BN folded) on XNNPACK's fp32 kernels in the ExecuTorch runtime."""
    lowered = lower_float(module, example)
    return ExecutorchProgram(lowered.pte, threads, lowered=lowered)


def load_pte(source: bytes | str | os.PathLike[str], threads: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load a .pte program written by :func:`to_pte_bytes` / :func:`to_pte_bytes_float` (bytes or a path)."""
    if isinstance(source, bytes | bytearray):
        data, where = bytes(source), "the given bytes"
    else:
        path = Path(source)
        if not path.is_file():
            raise QatError("engine.pte", f"{path} does not exist", "give the path of a .pte file written by qat")
        data, where = path.read_bytes(), str(path)
    if data[4:6] != b"ET":  # the flatbuffer file identifier of ExecuTorch programs ("ET" + schema version)
        raise QatError("engine.pte", f"{where} is not an ExecuTorch program", "give a .pte file written by qat")
    return ExecutorchProgram(data, threads)


def describe(program: ExecutorchProgram) -> dict[str, Any]:
    """What the delegate took (for records and tests)."""
    lowered = program.lowered
    if lowered is None:
        return {"delegates": None, "delegated_ops": None, "xnn_nodes": None}
    return {"delegates": lowered.delegates, "delegated_ops": dict(lowered.delegated_ops),
            "xnn_nodes": dict(lowered.xnn_nodes)}
