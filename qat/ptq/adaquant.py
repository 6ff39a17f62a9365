"""Sequential AdaQuant (Hubara et al. 2020 §3, eq. 2-3; the "sequential" variant of §3/Fig. 2).

Hubara eq. 2: (Δw, Δx, V) = argmin ||W·X - Q_Δw(W + V)·Q_Δx(X)||². Layer by layer in execution order, on a small
calibration set, Adam optimizes the layer's weights and bias (W + V), its weight step sizes Δw (a learnable
per-channel factor on the calibrated step, straight-through rounding as in LSQ) and the step Δx of the
activation quantizer that produces its input (a learnable per-tensor factor, Z fixed; see
:func:`input_step_quantizers` for which quantizers qualify). The loss is the MSE between the quantized layer on
Q_Δx(X_r) (X_r: the float input of that quantizer, computed by the already-optimized preceding layers) and the
float layer's output on the float input X. A layer whose calibration MSE does not improve keeps its previous
parameters and step sizes.
"""

from __future__ import annotations

import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn

from qat.ptq.layers import (
    QuantLayer,
    bias_parameter,
    capture,
    float_reference,
    freeze_weight_ranges,
    quantized_layers,
    weight_of,
)
from qat.quant.fake_quant import FakeQuantize
from qat.quant.modules import QConvBnAct, QLinear
from qat.quant.scheme import QuantSpec


def _per_channel_view(p: torch.Tensor, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if not spec.per_channel:
        return p.reshape(())
    shape = [1] * w.dim()
    shape[spec.ch_axis] = -1
    return p.reshape(shape)


class CalibratedRange:
    """The "observer" of a quantizer whose range is fixed by calibration: initialized, observes nothing."""

    initialized = True


class LearnableStepQuantizer(nn.Module):
    """Fake-quantizer with step size S = S_0 · |a| (``a`` learnable, 1 at start; Z fixed) and rounding through the
    straight-through estimator, so the loss reaches both the quantized tensor and the step (LSQ-style).

    Made from a calibrated :class:`FakeQuantize`: per channel for weights (Δw of Hubara eq. 2), per tensor for
    the activation that feeds a layer (Δx of Hubara eq. 2)."""

    quantizing = True  # always on; the range is the calibrated one (read by the simulated int32 bias)
    observing = False

    def __init__(self, fq: FakeQuantize) -> None:
        super().__init__()
        self.spec = fq.spec
        self.register_buffer("base_scale", fq.scale.detach().clone().float())
        self.register_buffer("zero_point", fq.zero_point.detach().clone().float())
        self.factor = nn.Parameter(torch.ones_like(self.base_scale))
        self.observer = CalibratedRange()

    @property
    def scale(self) -> torch.Tensor:
        """S = S_0 · |a|; for weights also the weight scale of the simulated int32 bias S_in·S_w (Jacob §2.4),
        for an input quantizer its S_in."""
        return self.base_scale * self.factor.abs().clamp_min(1e-3)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = _per_channel_view(self.scale, w, self.spec)
        z = _per_channel_view(self.zero_point, w, self.spec)
        x = w / s + z
        q = (x + (torch.round(x) - x).detach()).clamp(self.spec.qmin, self.spec.qmax)
        return (q - z) * s

    def write_to(self, fq: FakeQuantize) -> None:
        """Put the learned step into ``fq`` (a fresh tensor of ``fq.scale``'s shape, dtype and device)."""
        with torch.no_grad():
            fq.scale = self.scale.detach().to(device=fq.scale.device, dtype=fq.scale.dtype).reshape(fq.scale.shape)


def _first_layer_downstream(node: fx.Node, layer_nodes: dict[fx.Node, int]) -> fx.Node | None:
    """The quantized layer that runs first (graph order) among those that read ``node``'s value, directly or
    through any other ops."""
    best: tuple[int, fx.Node] | None = None
    stack, seen = list(node.users), set(node.users)
    while stack:
        user = stack.pop()
        if user in layer_nodes:
            if best is None or layer_nodes[user] < best[0]:
                best = (layer_nodes[user], user)
            continue  # what lies behind a layer runs after it
        for nxt in user.users:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return best[1] if best is not None else None


def input_step_quantizers(model: nn.Module) -> dict[str, str]:
    """Layer name -> name of the activation quantizer whose step Δx is learned with that layer (Hubara eq. 2).

    A layer qualifies when its input is directly the output of a plain per-tensor :class:`FakeQuantize` (the
    model-input quantizer included) that quantizes (calibrated) and that the graph calls at exactly one node: a
    quantizer that a same-grid op (average pooling) calls a second time defines that op's grid too, so its step
    stays. Each quantizer is learned once, with the first quantized layer in execution order that reads its
    output (e.g. ResNet's conv1, not the downsample beside it); if that layer does not qualify (its input
    reaches it through another op), the step is not learned at all, so no layer already optimized sees it
    change. Not an FX GraphModule: no layer qualifies."""
    if not isinstance(model, fx.GraphModule):
        return {}
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in model.graph.nodes if n.op == "call_module")
    layer_nodes: dict[fx.Node, int] = {}
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), QConvBnAct | QLinear):
            layer_nodes[node] = len(layer_nodes)
    found: dict[str, str] = {}
    for node in layer_nodes:
        name, source = str(node.target), node.args[0] if node.args else None
        if name in found or calls[name] != 1 or not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        fq_name = str(source.target)
        fq = modules.get(fq_name)
        if (type(fq) is FakeQuantize and not fq.spec.per_channel and fq.scale.numel() == 1 and fq.quantizing
                and fq.observer.initialized and calls[fq_name] == 1
                and _first_layer_downstream(source, layer_nodes) is node):
            found[name] = fq_name
    return found


def _mse(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    with torch.no_grad():
        pairs = zip(x.split(batch_size), y.split(batch_size), strict=True)
        total = sum(F.mse_loss(layer(a), b, reduction="sum").item() for a, b in pairs)
    return total / y.numel()


def _fake_quantized(fq: FakeQuantize, r: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``fq``'s output on ``r`` as the model computes it in eval mode (nothing observed)."""
    with torch.no_grad():
        return torch.cat([fq(chunk, observe=False) for chunk in r.split(batch_size)])


def adaquant_layer(layer: QuantLayer, x_q: torch.Tensor, y_float: torch.Tensor, *, iterations: int,
                   batch_size: int, lr_weight: float, lr_bias: float, lr_scale: float,
                   generator: torch.Generator, act_fq: FakeQuantize | None = None,
                   act_input: torch.Tensor | None = None) -> dict[str, float | bool | None]:
    """Optimize one layer in place (eval mode: BN folded with its running statistics); return its MSE.

    Hubara eq. 2 for one layer: W + V, the bias and Δw always; with ``act_fq`` (the quantizer producing the
    layer's input, ``x_q = act_fq(act_input)``) also its step Δx, fed as Q_Δx(``act_input``). Kept only if
    the calibration MSE improves; then the learned Δx is written into ``act_fq`` and its observing stops."""
    fq = layer.weight_fq
    if not isinstance(fq, FakeQuantize):
        raise TypeError("adaquant_layer needs a FakeQuantize weight quantizer")
    if act_fq is not None and (act_input is None or not (act_fq.quantizing and act_fq.observer.initialized)):
        act_fq = None  # nothing to learn: the input is not quantized (or its float input was not given)
    layer.eval()
    weight, bias = weight_of(layer), bias_parameter(layer)
    saved = (weight.detach().clone(), bias.detach().clone())
    before = _mse(layer, x_q, y_float, 256)
    learnable = LearnableStepQuantizer(fq).to(weight.device)
    layer.weight_fq = learnable
    groups = [{"params": [weight], "lr": lr_weight}, {"params": [bias], "lr": lr_bias},
              {"params": [learnable.factor], "lr": lr_scale}]
    params = [weight, bias, learnable.factor]
    act, inputs, bound = None, x_q, getattr(layer, "_input_fq", None)
    if act_fq is not None:
        assert act_input is not None
        act, inputs = LearnableStepQuantizer(act_fq).to(act_input.device), act_input
        groups.append({"params": [act.factor], "lr": lr_scale})
        params.append(act.factor)
        if bound is act_fq:  # the simulated int32 bias (scale S_in·S_w) follows the learned S_in
            layer.bind_input_quantizer(act)
    optimizer = torch.optim.Adam(groups)
    flags = [p.requires_grad for p in (weight, bias)]
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    n = inputs.shape[0]
    try:
        with torch.enable_grad():
            for _ in range(iterations):
                idx = torch.randint(n, (min(batch_size, n),), generator=generator)
                batch = inputs[idx] if act is None else act(inputs[idx])
                loss = F.mse_loss(layer(batch), y_float[idx])
                optimizer.zero_grad(set_to_none=True)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                optimizer.step()
    finally:
        layer.weight_fq = fq
        if act is not None and bound is act_fq:
            layer.bind_input_quantizer(act_fq)
        weight.requires_grad_(flags[0])
        bias.requires_grad_(flags[1])
        weight.grad = bias.grad = None
    old_scale = fq.scale.clone()
    learnable.write_to(fq)
    x_after = x_q
    if act is not None:
        assert act_fq is not None and act_input is not None
        old_act_scale = act_fq.scale
        act.write_to(act_fq)
        x_after = _fake_quantized(act_fq, act_input)  # what the model now feeds the layer
    after = _mse(layer, x_after, y_float, 256)
    accepted = after < before
    if not accepted:  # keep what was there
        with torch.no_grad():
            weight.copy_(saved[0])
            bias.copy_(saved[1])
        fq.scale = old_scale
        if act is not None:
            assert act_fq is not None
            act_fq.scale = old_act_scale
        after = before
    elif act is not None:
        assert act_fq is not None
        act_fq.observing = False  # the learned Δx is not recomputed from the observer's range later
    factor = float(act.factor.detach().abs().clamp_min(1e-3)) if act is not None and accepted else None
    return {"mse_before": before, "mse_after": after, "accepted": bool(accepted), "act_step_factor": factor}


def run_adaquant(model: nn.Module, images: torch.Tensor, *, iterations: int = 100, batch_size: int = 32,
                 lr_weight: float = 1e-5, lr_bias: float = 1e-3, lr_scale: float = 1e-3, seed: int = 0,
                 reference: nn.Module | None = None, learn_act_step: bool = True) -> dict[str, object]:
    """Sequential AdaQuant over every quantized layer of a calibrated ``model`` (in place).

    ``reference`` is the float network (default: a copy of ``model`` with quantization off, taken now).
    ``learn_act_step``: also learn the step Δx of each layer's input quantizer where one qualifies
    (:func:`input_step_quantizers`; Hubara eq. 2), at the learning rate ``lr_scale``; false: Δx stays as
    calibrated. Layers with a two-tensor weight quantizer are left as they are. Per layer the report gives the
    calibration MSE before and after, whether the result was kept, the quantizer whose Δx was learned with it
    (``act_quantizer``) and the kept factor S/S_0 on its step (``act_step_factor``; null: Δx not learned or
    not kept).
    """
    started = time.time()
    reference = reference if reference is not None else float_reference(model)
    freeze_weight_ranges(model)
    generator = torch.Generator().manual_seed(seed)
    act_sources = input_step_quantizers(model) if learn_act_step else {}
    layers: dict[str, dict[str, object]] = {}
    skipped: list[str] = []
    for name, layer in quantized_layers(model):
        if not isinstance(layer.weight_fq, FakeQuantize):
            skipped.append(name)
            continue
        x_q = capture(model, name, images)
        y_float = capture(reference, name, images, output=True)
        fq_name = act_sources.get(name)
        act_fq, act_input = None, None
        if fq_name is not None:
            act_fq, act_input = model.get_submodule(fq_name), capture(model, fq_name, images)
            assert isinstance(act_fq, FakeQuantize)
        result = adaquant_layer(layer, x_q, y_float, iterations=iterations, batch_size=batch_size,
                                lr_weight=lr_weight, lr_bias=lr_bias, lr_scale=lr_scale, generator=generator,
                                act_fq=act_fq, act_input=act_input)
        layers[name] = {**result, "act_quantizer": fq_name}
    model.eval()
    return {"layers": layers, "skipped_two_tensor": skipped, "images": int(images.shape[0]),
            "iterations": iterations, "learn_act_step": learn_act_step, "time_s": time.time() - started}
