"""Shared plumbing of the PTQ methods: the quantized layers of a prepared graph, capturing a layer's input
and output on calibration images, switching simulated quantization off, per-layer MACs and biases."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn

from qat.errors import QatError
from qat.quant.fake_quant import FakeQuantize
from qat.quant.modules import QConvBnAct, QLinear

QuantLayer = QConvBnAct | QLinear


class _StopForward(Exception):
    """Raised by a capture hook once the layer of interest has run: the rest of the forward is skipped."""


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """Quantized conv/linear layers in execution order (graph order for an FX GraphModule)."""
    modules = dict(model.named_modules())
    if isinstance(model, fx.GraphModule):
        names = [str(n.target) for n in model.graph.nodes if n.op == "call_module"]
    else:
        names = list(modules)
    seen: set[str] = set()
    out = []
    for name in names:
        if name not in seen and isinstance(modules.get(name), QConvBnAct | QLinear):
            seen.add(name)
            out.append((name, modules[name]))
    return out


def weight_of(layer: QuantLayer) -> nn.Parameter:
    return layer.conv.weight if isinstance(layer, QConvBnAct) else layer.linear.weight


def bias_parameter(layer: QuantLayer) -> nn.Parameter:
    """The parameter that adds one-for-one to the layer's (folded) pre-activation bias; created if absent.

    Conv with BN: BN's beta (b_fold = beta + (b - mu)·gamma/sigma, Jacob eq. 14); conv or linear without BN:
    its own bias.
    """
    if isinstance(layer, QConvBnAct) and layer.bn is not None:
        if layer.bn.bias is None:
            raise QatError("ptq", "a batch norm without affine parameters has no bias to correct",
                           "use affine batch norm (the default) in the float model")
        return layer.bn.bias
    inner = layer.conv if isinstance(layer, QConvBnAct) else layer.linear
    if inner.bias is None:
        inner.bias = nn.Parameter(torch.zeros(inner.weight.shape[0], device=inner.weight.device))
    return inner.bias


def preactivation(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's output before its fused activation (where a bias change lands one-for-one)."""
    if isinstance(layer, QLinear) or layer.activation == "none":
        return layer(x)
    activation, layer.activation = layer.activation, "none"
    try:
        return layer(x)
    finally:
        layer.activation = activation


def weight_quantizers(model: nn.Module) -> Iterator[nn.Module]:
    for _, layer in quantized_layers(model):
        yield layer.weight_fq


def freeze_weight_ranges(model: nn.Module) -> None:
    """Give every weight quantizer (S, Z) from the current folded weights, then stop it observing."""
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            fq = layer.weight_fq
            if isinstance(fq, FakeQuantize) and fq.observing:
                fq.observer(layer.folded_weight_and_bias()[0])
                fq.update_qparams()
                fq.observing = False


@contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Every quantizer passes values through unchanged and observes nothing: the float network."""
    saved = [(m, m.quantizing, m.observing) for m in model.modules() if hasattr(m, "quantizing")]
    for m, _, _ in saved:
        m.quantizing, m.observing = False, False
    try:
        yield model
    finally:
        for m, quantizing, observing in saved:
            m.quantizing, m.observing = quantizing, observing


def float_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` with quantization switched off for good: the float targets."""
    reference = copy.deepcopy(model).eval()
    for m in reference.modules():
        if hasattr(m, "quantizing"):
            m.quantizing, m.observing = False, False
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


def batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    return images.split(batch_size)


@torch.no_grad()
def capture(model: nn.Module, layer_name: str, images: torch.Tensor, batch_size: int = 64,
            output: bool = False) -> torch.Tensor:
    """The input (or output) of ``layer_name`` over ``images``, running ``model`` in eval mode only as far
    as that layer."""
    layer = model.get_submodule(layer_name)
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple, result: torch.Tensor) -> None:
        seen.append((result if output else args[0]).detach())
        raise _StopForward

    was_training = model.training
    model.eval()
    handle = layer.register_forward_hook(hook)
    try:
        for chunk in batches(images, batch_size):
            try:
                model(chunk)
            except _StopForward:
                continue
            raise QatError("ptq", f"layer {layer_name} did not run in the forward pass",
                           "PTQ needs every quantized layer to be called once per forward")
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(seen)


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of each quantized layer (one forward of ``example``)."""
    macs: dict[str, int] = {}
    handles = []
    for name, layer in quantized_layers(model):
        def hook(module: nn.Module, _args: tuple, out: torch.Tensor, name: str = name) -> None:
            w = weight_of(module)
            per_output = w[0].numel()  # (C_in / groups)·kh·kw for a conv, in_features for a linear
            macs[name] = int(out[0].numel() * per_output)
        handles.append(layer.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with quantization_disabled(model):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs


def load_images(loader: Iterable, batches_wanted: int) -> torch.Tensor:
    """The first ``batches_wanted`` image batches of a (images, labels) loader, concatenated."""
    chunks = []
    for i, item in enumerate(loader):
        if i >= batches_wanted:
            break
        chunks.append(item[0] if isinstance(item, list | tuple) else item)
    if not chunks:
        raise QatError("ptq.calibration_batches", "the calibration loader yielded no images",
                       "give a loader with at least one batch")
    return torch.cat(chunks)
