"""Conversion of a prepared (simulated-quantization) model into the canonical integer model.

Walks the prepared FX graph in order. Each quantized value of the simulation maps to one integer tensor;
conv/linear weights are folded with the running BN statistics (Jacob eq. 14, inference form), quantized with
the simulation's own weight quantizer, and biases are quantized to int32 with scale S_in·S_w (Jacob §2.4).
Every op that changes scale carries its fixed-point multipliers (M0, n): conv/linear M = S_in·S_w/S_out
(Jacob eq. 5-6); add the TFLite ADD parameters (input multipliers S_i/2max(S), output multiplier
2max(S)/(2^L·S_out), headroom shift L); cat one multiplier S_i/S_out per input; mul (squeeze-excite's gate times
its input) M = S_a·S_b/S_out (TFLite MUL). Hardswish and hardsigmoid carry no parameters: their integer form is a
table over the input grid (:mod:`qat.intmodel.elementwise`). Average pooling must keep its input's (S, Z); the
simulation rounds it as the integer model does (:class:`qat.quant.pooling.GridAveragePool`).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from qat.errors import NoIntegerForm, QatError
from qat.intmodel.fixedpoint import add_left_shift, add_multipliers, quantize_multiplier
from qat.intmodel.graph import IntModel, IntNode, TensorQ
from qat.intmodel.pooling import functional_pool_attrs, pool_attrs
from qat.quant.fake_quant import FakeQuantize
from qat.quant.modules import QConvBnAct, QLinear
from qat.quant.pooling import GridAveragePool
from qat.quant.prepare import _ADD_FUNCTIONS, _relu_kind, is_passthrough, is_same_grid
from qat.quant.scheme import quantize

SUPPORTED = ("supported ops: conv(+BN)(+ReLU/ReLU6), linear, add(+ReLU), mul, hardswish, hardsigmoid, avg/max pool, "
             "flatten, cat")
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_TABLE_MODULES = {nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid"}
_TABLE_FUNCTIONS = {F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid"}


def _tensor_q(fq: FakeQuantize, layer: str) -> TensorQ:
    if not fq.observer.initialized:
        raise QatError("convert", f"the activation quantizer of layer {layer} has no range yet",
                       "calibrate or train the prepared model before converting it")
    return TensorQ(scale=float(fq.scale.detach().reshape(-1)[0]), zero_point=int(fq.zero_point.reshape(-1)[0]),
                   bits=fq.spec.bits, signed=fq.spec.signed, qmin=fq.spec.qmin, qmax=fq.spec.qmax)


def _activation_clamp(activation: str, out: TensorQ) -> tuple[int, int]:
    """A fused ReLU/ReLU6 is a clamp of the output's integer range (Jacob §2.4)."""
    low, high = out.qmin, out.qmax
    if activation in ("relu", "relu6"):
        low = max(low, out.zero_point)
    if activation == "relu6":
        high = min(high, out.zero_point + round(6.0 / out.scale))
    return low, high


def _table_op(node: fx.Node, module: nn.Module | None) -> str | None:
    """hardswish / hardsigmoid as a module or a function (their integer form: a table over the input grid)."""
    if module is not None:
        return _TABLE_MODULES.get(type(module))
    return _TABLE_FUNCTIONS.get(node.target) if node.op == "call_function" else None


class _Converter:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.nodes: list[IntNode] = []
        self.env: dict[str, str] = {}  # fx node name -> int node name holding its quantized value
        self.qparams: dict[str, TensorQ] = {}  # int node name -> its output quantization
        self.pending: dict[str, IntNode] = {}  # fx node name -> int node awaiting its output quantizer

    def _fq_of(self, node: fx.Node) -> FakeQuantize | None:
        if node.op == "call_module" and isinstance(self.modules[node.target], FakeQuantize):
            return self.modules[node.target]
        return None

    def _input(self, node: fx.Node) -> str:
        if node.name not in self.env:
            raise QatError("convert", f"{node.name} feeds an integer op but is not quantized",
                           "every tensor between integer ops needs an activation quantizer; "
                           "was a layer kept in float?")
        return self.env[node.name]

    def _emit(self, node: IntNode, fx_name: str) -> None:
        self.nodes.append(node)
        if node.out is None:
            self.pending[fx_name] = node
        else:
            self.env[fx_name] = node.name
            self.qparams[node.name] = node.out

    def _weights(self, module: QConvBnAct | QLinear, in_q: TensorQ, name: str) -> dict:
        with torch.no_grad():
            w, b = module.folded_weight_and_bias()
            fq = module.weight_fq
            fq.observer.to(w.device)
            if fq.observing:
                fq.observer(w)
                fq.update_qparams()
            spec = fq.spec
            if spec.per_channel and spec.ch_axis % w.dim() != 0:
                raise QatError("quant.weight_ch_axis", f"{spec.ch_axis} (per-input-channel weight grids) has no "
                               "integer form: requantization is per output channel (Jacob §2.2)",
                               "convert models quantized with weight_ch_axis=0, or keep this one simulated")
            w_scale = fq.scale.detach().reshape(-1).float()
            w_zp = fq.zero_point.reshape(-1).to(torch.int32)
            w_int = quantize(w, fq.scale, fq.zero_point, spec)
            if not spec.per_channel:
                w_scale = w_scale.expand(w.shape[0]).clone()
                w_zp = w_zp.expand(w.shape[0]).clone()
            bias_scale = in_q.scale * w_scale.double()
            bias_codes = torch.round(b.double() / bias_scale)
            largest = float(bias_codes.abs().max()) if bias_codes.numel() else 0.0
            if largest > 2**31 - 1:  # saturating it would depart from the simulation without a word
                raise NoIntegerForm(
                    "convert", f"layer {name}: its int32 bias b/(S_in·S_w) reaches {largest:.4g}, beyond int32 "
                    f"(smallest weight step S_w = {float(w_scale.min()):.3g}: a learned step size at its floor, or a "
                    "near-empty input grid)", "lower quant.step_lr_scale or keep this layer at other bits")
            bias_int = bias_codes.to(torch.int32)
        return {"weight": w_int, "weight_scale": w_scale, "weight_zero_point": w_zp, "bias": bias_int,
                "bias_scale": bias_scale.float(), "weight_bits": spec.bits,
                "weight_per_channel": spec.per_channel, "weight_qmin": spec.qmin, "weight_qmax": spec.qmax}

    def _requant(self, node: IntNode, in_q: TensorQ) -> None:
        """Attach M = S_in·S_w/S_out as (M0, n) per output channel (Jacob eq. 5-6)."""
        assert node.out is not None
        real = node.tensors["weight_scale"].double() * in_q.scale / node.out.scale
        pairs = [quantize_multiplier(float(m)) for m in real]
        node.tensors["multiplier"] = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        node.tensors["shift"] = torch.tensor([p[1] for p in pairs], dtype=torch.int32)
        low, high = _activation_clamp(node.attrs.get("activation", "none"), node.out)
        node.attrs["clamp_min"], node.attrs["clamp_max"] = low, high

    def _add_params(self, node: IntNode) -> None:
        """TFLite quantized ADD: rescale both inputs to a common fine grid, add, requantize (kernels/add.cc)."""
        assert node.out is not None
        in_qs = [self.qparams[i] for i in node.inputs]
        left_shift = add_left_shift(max(q.bits for q in [*in_qs, node.out]))
        inputs, (m0, n) = add_multipliers([q.scale for q in in_qs], node.out.scale, left_shift)
        node.attrs["left_shift"] = left_shift
        node.tensors["input_multiplier"] = torch.tensor([p[0] for p in inputs], dtype=torch.int64)
        node.tensors["input_shift"] = torch.tensor([p[1] for p in inputs], dtype=torch.int32)
        node.tensors["multiplier"] = torch.tensor([m0], dtype=torch.int64)
        node.tensors["shift"] = torch.tensor([n], dtype=torch.int32)
        node.attrs["clamp_min"], node.attrs["clamp_max"] = _activation_clamp(node.attrs["activation"], node.out)

    def _cat_params(self, node: IntNode) -> None:
        """Per-input requantization S_i/S_out, applied to (q - Z_i)·2^L for precision (like ADD's headroom)."""
        assert node.out is not None
        in_qs = [self.qparams[i] for i in node.inputs]
        pairs = [quantize_multiplier(q.scale / node.out.scale) for q in in_qs]
        node.attrs["left_shift"] = add_left_shift(max(q.bits for q in [*in_qs, node.out]))
        node.tensors["input_multiplier"] = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
        node.tensors["input_shift"] = torch.tensor([p[1] for p in pairs], dtype=torch.int32)
        node.attrs["clamp_min"], node.attrs["clamp_max"] = node.out.qmin, node.out.qmax

    def _mul_params(self, node: IntNode) -> None:
        """TFLite quantized MUL: (q_a - Z_a)(q_b - Z_b) requantized by M = S_a·S_b/S_out (kernels/mul.cc)."""
        assert node.out is not None
        a, b = (self.qparams[i] for i in node.inputs)
        m0, n = quantize_multiplier(a.scale * b.scale / node.out.scale)
        node.tensors["multiplier"] = torch.tensor([m0], dtype=torch.int64)
        node.tensors["shift"] = torch.tensor([n], dtype=torch.int32)
        node.attrs["clamp_min"], node.attrs["clamp_max"] = node.out.qmin, node.out.qmax

    def _check_same_grid(self, node: IntNode) -> None:
        """Average pooling divides an integer sum; it has no requantization step (TFLite AVERAGE_POOL_2D)."""
        in_q = self.qparams[node.inputs[0]]
        if node.out != in_q:
            raise QatError("convert", f"average pool {node.name} changes (S, Z) from ({in_q.scale:.6g}, "
                           f"{in_q.zero_point}) to ({node.out.scale:.6g}, {node.out.zero_point})",
                           "average pooling must reuse its input's quantizer (prepare with qat.quant.prepare)")

    def convert(self) -> IntModel:
        input_shape: list[int] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                meta = node.meta.get("tensor_meta")
                input_shape = list(meta.shape) if meta is not None else []
                continue
            if node.op == "output":
                src = node.args[0]
                self.nodes.append(IntNode(name="output", op="dequantize", inputs=[self._input(src)], out=None))
                continue
            fq = self._fq_of(node)
            if fq is not None:
                self._on_fake_quant(node, fq)
                continue
            self._on_op(node)
        if self.pending:
            name = next(iter(self.pending))
            raise QatError("convert", f"{name} has no output quantizer", "prepare the model with qat.quant.prepare")
        return IntModel(nodes=self.nodes, input_shape=input_shape)

    def _on_fake_quant(self, node: fx.Node, fq: FakeQuantize) -> None:
        src = node.args[0]
        if src.op == "placeholder":
            self._emit(IntNode(name="input", op="quantize", inputs=[], out=_tensor_q(fq, f"input ({src.name})")),
                       node.name)
            return
        if src.name in self.pending:
            int_node = self.pending.pop(src.name)
            int_node.out = _tensor_q(fq, int_node.name)
            if int_node.op in ("conv2d", "linear"):
                self._requant(int_node, self.qparams[int_node.inputs[0]])
            elif int_node.op == "add":
                self._add_params(int_node)
            elif int_node.op == "cat":
                self._cat_params(int_node)
            elif int_node.op == "mul":
                self._mul_params(int_node)
            elif int_node.op == "avg_pool":
                self._check_same_grid(int_node)
            self.env[node.name] = int_node.name
            self.qparams[int_node.name] = int_node.out
            return
        raise NoIntegerForm("convert", f"quantizer {node.target} follows {src.name}, which has no integer form",
                           SUPPORTED)

    def _on_op(self, node: fx.Node) -> None:
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, QConvBnAct):
            in_name = self._input(node.args[0])
            c = module.conv
            attrs = {"stride": list(c.stride), "padding": list(c.padding), "dilation": list(c.dilation),
                     "groups": c.groups, "activation": module.activation}
            tensors = self._weights(module, self.qparams[in_name], node.name)
            attrs.update({k: tensors.pop(k) for k in ("weight_bits", "weight_per_channel", "weight_qmin",
                                                      "weight_qmax")})
            self._emit(IntNode(node.name, "conv2d", [in_name], None, attrs, tensors), node.name)
        elif isinstance(module, QLinear):
            in_name = self._input(node.args[0])
            tensors = self._weights(module, self.qparams[in_name], node.name)
            attrs = {k: tensors.pop(k) for k in ("weight_bits", "weight_per_channel", "weight_qmin", "weight_qmax")}
            attrs["activation"] = "none"
            self._emit(IntNode(node.name, "linear", [in_name], None, attrs, tensors), node.name)
        elif node.op == "call_function" and node.target in _ADD_FUNCTIONS:
            inputs = [self._input(a) for a in node.args[:2]]
            self._emit(IntNode(node.name, "add", inputs, None, {"activation": "none"}), node.name)
        elif node.op == "call_function" and node.target in _MUL_FUNCTIONS and len(node.args) == 2 and all(
                isinstance(a, fx.Node) for a in node.args):  # two tensors; a constant factor has no grid here
            self._emit(IntNode(node.name, "mul", [self._input(a) for a in node.args], None), node.name)
        elif table_op := _table_op(node, module):
            self._emit(IntNode(node.name, table_op, [self._input(node.args[0])], None), node.name)
        elif _relu_kind(node, self.modules) and node.args[0].name in self.pending:
            int_node = self.pending.pop(node.args[0].name)
            if int_node.op != "add" or int_node.attrs["activation"] != "none":
                raise QatError("convert", f"{node.name}: ReLU after {int_node.name} cannot be fused",
                               "only add -> ReLU is fused after preparation")
            int_node.attrs["activation"] = _relu_kind(node, self.modules)
            self.pending[node.name] = int_node
        elif is_same_grid(node, self.modules):
            in_name = self._input(node.args[0])
            if isinstance(module, GridAveragePool):
                attrs = dict(module.attrs)
            elif isinstance(module, nn.AdaptiveAvgPool2d | nn.AvgPool2d):
                attrs = pool_attrs(module)
            else:
                attrs = self._pool_attrs_functional(node)
            self._emit(IntNode(node.name, "avg_pool", [in_name], None, attrs), node.name)
        elif is_passthrough(node, self.modules):
            self._on_passthrough(node, module)
        elif node.op == "call_function" and node.target is torch.cat:
            inputs = [self._input(a) for a in node.args[0]]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            self._emit(IntNode(node.name, "cat", inputs, None, {"dim": dim}), node.name)
        else:
            what = node.target if node.op != "call_module" else type(module).__name__
            raise NoIntegerForm("convert", f"{node.name} ({what}) has no integer implementation", SUPPORTED)

    @staticmethod
    def _pool_attrs_functional(node: fx.Node) -> dict:
        attrs = functional_pool_attrs(node)
        if attrs is None:
            raise NoIntegerForm("convert", f"{node.name}: functional avg_pool2d is not supported yet",
                               "use nn.AvgPool2d or adaptive average pooling")
        return attrs

    def _on_passthrough(self, node: fx.Node, module: nn.Module | None) -> None:
        src = node.args[0]
        in_name = self._input(src)
        if isinstance(module, nn.Dropout | nn.Identity) or (node.op == "call_function" and node.target in (
                torch.nn.functional.dropout,)) or (node.op == "call_method" and node.target == "contiguous"):
            self.env[node.name] = in_name
            return
        q = self.qparams[in_name]
        if isinstance(module, nn.MaxPool2d):
            attrs = {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                     "dilation": module.dilation, "ceil_mode": module.ceil_mode}
            self._emit(IntNode(node.name, "max_pool", [in_name], q, attrs), node.name)
        elif (node.op == "call_function" and node.target is torch.flatten) or isinstance(module, nn.Flatten) or (
                node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 1 if module else 0)
            if isinstance(module, nn.Flatten):
                start = module.start_dim
            self._emit(IntNode(node.name, "flatten", [in_name], q, {"start_dim": start}), node.name)
        elif node.op == "call_function" and node.target is operator.getitem:
            raise NoIntegerForm("convert", f"{node.name}: indexing has no integer implementation yet",
                               "restructure the model to avoid tensor indexing between quantized ops")
        else:
            raise NoIntegerForm("convert", f"{node.name} ({node.target}) has no integer implementation yet",
                               "supported passthrough ops: dropout, identity, max pool, flatten")


def convert(prepared: fx.GraphModule) -> IntModel:
    """Canonical integer model of a prepared model (evaluated with running BN statistics)."""
    was_training = prepared.training
    prepared.eval()
    try:
        model = _Converter(prepared).convert()
    finally:
        prepared.train(was_training)
    config = getattr(prepared, "qat_config", None)
    if config is not None:
        from dataclasses import asdict

        model.meta["quant_config"] = asdict(config)
    return model
