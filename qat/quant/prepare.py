"""Graph preparation: any traceable CNN -> simulated-quantization model (Jacob §3; whitepaper §3.2).

The model is traced with ``torch.fx`` (the tracer, not torch.ao's deprecated quantization API). Then:

1. conv -> BN -> ReLU/ReLU6 chains become :class:`QConvBnAct` (weights fake-quantized after folding);
   linear layers become :class:`QLinear`.
2. Activation fake-quantizers are inserted wherever the integer model holds a quantized tensor: at the
   input, after every value-changing op (fused convs, add, add+ReLU, concat, hardswish, the logits, ...),
   never after ops that keep values on their input grid (max-pool, flatten, dropout, reshape). Average
   pooling re-rounds to its input's grid (TFLite keeps the input's (S, Z) for pooling).
3. Per-layer overrides (fnmatch patterns over module names) change bit widths or keep layers in float.

Nothing half-prepared is returned: the input model is deep-copied and errors are raised before returning.
"""

from __future__ import annotations

import copy
import fnmatch
import operator
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from qat.errors import QatError
from qat.intmodel.pooling import functional_pool_attrs, pool_attrs
from qat.quant.config import LayerOverride, QuantConfig
from qat.quant.fake_quant import FakeQuantize
from qat.quant.lsq import LSQ_NAMES, LearnedStepQuantize
from qat.quant.modules import QConvBnAct, QLinear
from qat.quant.observers import make_observer
from qat.quant.pooling import GridAveragePool

ACT_QUANT_PREFIX = "act_quant"
POOL_PREFIX = "grid_pool"  # functional average pools become GridAveragePool modules under this name

_PASSTHROUGH_MODULES = (nn.Dropout, nn.Identity, nn.Flatten, nn.MaxPool2d, nn.Unflatten)
_PASSTHROUGH_FUNCTIONS = {torch.flatten, F.dropout, F.max_pool2d, torch.reshape, operator.getitem,
                          torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.chunk,
                          torch.split}
_PASSTHROUGH_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                        "unsqueeze", "chunk", "split", "size", "dim"}
_SAME_GRID_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, GridAveragePool)
_SAME_GRID_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d}
_RELU_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def _relu_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _RELU_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return _RELU_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _is_module(node: fx.Node, modules: dict[str, nn.Module], kinds: type | tuple[type, ...]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], kinds)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and meta.dtype.is_floating_point


def is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops whose outputs stay on their input's integer grid: no requantization needed."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASSTHROUGH_MODULES)
    if node.op == "call_function":
        return node.target in _PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in _PASSTHROUGH_METHODS


def is_same_grid(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Average pooling: re-rounded to its input's grid (Jacob §2.4 / TFLite)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _SAME_GRID_MODULES)
    return node.op == "call_function" and node.target in _SAME_GRID_FUNCTIONS


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` or raise a one-line error naming the model."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracer failure is reported the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QatError("model", f"{type(model).__name__} cannot be traced by torch.fx: {first}",
                       "remove data-dependent control flow from forward() or wrap it as a leaf module") from exc


class _Preparer:
    def __init__(self, model: nn.Module, config: QuantConfig, example_input: torch.Tensor) -> None:
        config.check_bits()
        self.config = config
        self.gm = trace(model)
        self.modules = dict(self.gm.named_modules())
        self.override_hits: dict[str, int] = {o.pattern: 0 for o in config.overrides}
        was_training = self.gm.training
        self.gm.eval()
        with torch.no_grad():
            ShapeProp(self.gm).propagate(example_input)
        self.gm.train(was_training)

    # --- overrides -------------------------------------------------------------------------------------
    def _override(self, name: str) -> LayerOverride | None:
        found = None
        for o in self.config.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                self.override_hits[o.pattern] += 1
                found = found or o
        return found

    def _weight_fq(self, bits: int | None, layer: str, weight: torch.Tensor) -> FakeQuantize:
        spec = self.config.weight_spec(bits)
        if spec.per_channel and not -weight.dim() <= spec.ch_axis < weight.dim():
            raise QatError("quant.weight_ch_axis", f"layer {layer} has a {weight.dim()}-d weight "
                           f"{tuple(weight.shape)}; axis {spec.ch_axis} does not exist",
                           f"use an axis in [{-weight.dim()}, {weight.dim() - 1}] (0 = output channels)")
        if self.config.weight_observer in LSQ_NAMES:
            init = self.config.weight_step_init or self.config.step_init
            return LearnedStepQuantize(spec, self.config.weight_observer, weights=True,
                                       lr_scale=self.config.step_lr_scale, init=init, domain=self.config.step_domain)
        observer = make_observer(self.config.weight_observer, per_channel=spec.per_channel, ch_axis=spec.ch_axis,
                                 key="quant.weight_observer", spec=spec, weights=True,
                                 percentile=self.config.percentile)
        return FakeQuantize(spec, observer, observe_in_eval=True)

    def _act_fq(self, bits: int | None = None) -> FakeQuantize:
        spec = self.config.act_spec(bits)
        if self.config.act_observer in LSQ_NAMES:
            return LearnedStepQuantize(spec, self.config.act_observer, lr_scale=self.config.step_lr_scale,
                                       init=self.config.step_init, domain=self.config.step_domain)
        observer = make_observer(self.config.act_observer, per_channel=False, ch_axis=0, key="quant.act_observer",
                                 spec=spec, ema_decay=self.config.ema_decay, percentile=self.config.percentile)
        return FakeQuantize(spec, observer)

    # --- step 1: fuse conv/BN/act and linear ----------------------------------------------------------
    def fuse(self) -> None:
        graph = self.gm.graph
        for node in list(graph.nodes):
            if _is_module(node, self.modules, nn.Conv2d):
                self._fuse_conv(node)
            elif _is_module(node, self.modules, nn.Linear):
                override = self._override(node.target)
                if override and override.keep_float:
                    continue
                linear = self.modules[node.target]
                q = QLinear(linear, self._weight_fq(override.weight_bits if override else None, node.target,
                                                    linear.weight))
                self.gm.add_submodule(node.target, q)
        graph.lint()
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
        self.modules = dict(self.gm.named_modules())

    def _fuse_conv(self, conv_node: fx.Node) -> None:
        override = self._override(conv_node.target)
        if override and override.keep_float:
            return
        conv = self.modules[conv_node.target]
        last, bn_node = conv_node, None
        user = _only_user(conv_node)
        if user is not None and _is_module(user, self.modules, nn.BatchNorm2d):
            bn_node = last = user
        activation = "none"
        user = _only_user(last)
        if user is not None and _relu_kind(user, self.modules):
            activation, last = _relu_kind(user, self.modules), user
        if activation != "none" and self.config.activation:
            activation = self.config.activation
        bn = self.modules[bn_node.target] if bn_node is not None else None
        weight_fq = self._weight_fq(override.weight_bits if override else None, conv_node.target, conv.weight)
        fused = QConvBnAct(conv, bn, activation, weight_fq, self.config.bn_fold)
        self.gm.add_submodule(conv_node.target, fused)
        if bn_node is not None:  # now owned by the fused module; the old path would shadow it
            self.gm.delete_submodule(bn_node.target)
        last.replace_all_uses_with(conv_node)
        while last is not conv_node:
            previous = last.args[0]
            self.gm.graph.erase_node(last)
            last = previous
        conv_node.meta["act_bits"] = override.act_bits if override else None

    # --- step 2: activation quantizers ----------------------------------------------------------------
    def _insert_fq(self, node: fx.Node, target: str, observe: bool = True) -> fx.Node:
        graph = self.gm.graph
        with graph.inserting_after(node):
            fq_node = graph.call_module(target, (node,), {} if observe else {"observe": False})
        node.replace_all_uses_with(fq_node, delete_user_cb=lambda user: user is not fq_node)
        fq_node.meta["tensor_meta"] = node.meta.get("tensor_meta")
        fq_node.meta["quantizes"] = node.name
        return fq_node

    def _new_fq(self, node: fx.Node, bits: int | None) -> fx.Node:
        target = f"{ACT_QUANT_PREFIX}.{node.name}"
        self.gm.add_submodule(target, self._act_fq(bits))
        return self._insert_fq(node, target)

    def _producer_fq(self, node: fx.Node) -> fx.Node | None:
        """The activation quantizer that defines ``node``'s grid, looking through passthrough ops."""
        while node.op != "placeholder":
            if node.op == "call_module" and str(node.target).startswith(ACT_QUANT_PREFIX + "."):
                return node
            if not is_passthrough(node, self.modules) or not node.args:
                return None
            node = node.args[0]
        return None

    def _round_pool_like_the_integer_model(self, node: fx.Node, source: nn.Module) -> None:
        """An average pool on its input's grid becomes a :class:`GridAveragePool` bound to that grid's quantizer,
        so the simulation rounds each pooled value as the integer model does (ties included)."""
        if node.op == "call_module":
            module = self.modules[node.target]
            attrs = module.attrs if isinstance(module, GridAveragePool) else pool_attrs(module)
            pool = GridAveragePool(attrs)
            self.gm.add_submodule(str(node.target), pool)
        else:
            functional = functional_pool_attrs(node)
            if functional is None:
                return  # functional avg_pool2d: no integer form yet (the conversion says so)
            pool = GridAveragePool(functional)
            target = f"{POOL_PREFIX}.{node.name}"
            self.gm.add_submodule(target, pool)
            node.op, node.target, node.args, node.kwargs = "call_module", target, (node.args[0],), {}
        pool.bind_input_quantizer(source)
        self.modules = dict(self.gm.named_modules())

    def insert_act_quant(self) -> None:
        graph = self.gm.graph
        for node in list(graph.nodes):
            if node.op in ("output", "get_attr") or not _is_float_tensor(node):
                continue
            if node.op != "placeholder" and is_passthrough(node, self.modules):
                continue
            user = _only_user(node)
            if (node.op == "call_function" and node.target in _ADD_FUNCTIONS and user is not None
                    and _relu_kind(user, self.modules)):
                continue  # add -> ReLU is one integer op; the ReLU's output gets the quantizer
            if node.op == "call_module" and isinstance(self.modules[node.target], QLinear | QConvBnAct):
                bits = node.meta.get("act_bits")
            elif node.op == "placeholder":
                bits = self.config.input_bits
            else:
                bits = None
            if is_same_grid(node, self.modules):
                source = self._producer_fq(node.args[0]) if node.args else None
                if source is not None:
                    self._round_pool_like_the_integer_model(node, self.gm.get_submodule(str(source.target)))
                    self._insert_fq(node, source.target, observe=False)
                    continue
            self._new_fq(node, bits)
        graph.lint()
        self.gm.recompile()
        self.modules = dict(self.gm.named_modules())

    def mark_activation_handoffs(self) -> None:
        """A conv whose ReLU/ReLU6 output feeds one activation quantizer and nothing else may hand its gradient
        mask to that quantizer's kernel (one backward pass fewer; :func:`qat.quant.vectorized.hand_off_activation`)."""
        for node in self.gm.graph.nodes:
            module = self.modules.get(str(node.target)) if node.op == "call_module" else None
            if not isinstance(module, QConvBnAct) or module.activation not in ("relu", "relu6"):
                continue
            user = _only_user(node)
            if (user is not None and user.op == "call_module" and not user.kwargs
                    and type(self.modules.get(str(user.target))) is FakeQuantize):
                module.activation_handoff = True

    def bind_bias_quantizers(self) -> None:
        """Give each conv/linear the quantizer of its input, so its bias is simulated as the int32 bias of
        scale S_in·S_w that the integer model adds (Jacob §2.4, eq. 9-10)."""
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[node.target], QConvBnAct | QLinear):
                source = self._producer_fq(node.args[0])
                if source is not None:
                    self.modules[node.target].bind_input_quantizer(self.modules[source.target])

    def check_overrides(self) -> None:
        unused = [pattern for pattern, hits in self.override_hits.items() if hits == 0]
        if unused:
            names = [n for n, m in self.modules.items() if isinstance(m, nn.Conv2d | nn.Linear | QConvBnAct | QLinear)]
            raise QatError("quant.overrides", f"pattern {unused[0]!r} matches no layer",
                           f"layer names look like: {', '.join(names[:4])}, ...")


def prepare(model: nn.Module, config: QuantConfig | None = None,
            example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """Return a simulated-quantization copy of ``model`` (the original is left untouched).

    ``example_input`` (default: one 3×224×224 image) is used once to find which nodes carry tensors.
    """
    config = config or QuantConfig()
    if example_input is None:
        example_input = torch.randn(1, 3, 224, 224)
    preparer = _Preparer(copy.deepcopy(model), config, example_input)
    preparer.fuse()
    preparer.insert_act_quant()
    preparer.mark_activation_handoffs()
    preparer.bind_bias_quantizers()
    preparer.check_overrides()
    gm = preparer.gm
    gm.qat_config = config  # type: ignore[attr-defined]
    return gm


def fake_quant_modules(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            yield name, module


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode everywhere (BN uses running statistics) except the quantizers, which observe ranges."""
    was_training = model.training
    model.eval()
    quantizers = [fq for _, fq in fake_quant_modules(model)]
    for fq in quantizers:
        fq.train()
        fq.calibrating = True
    try:
        yield model
    finally:
        for fq in quantizers:
            fq.calibrating = False
        model.train(was_training)
