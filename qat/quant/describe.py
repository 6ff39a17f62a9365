"""The quantization recipe as it ran, read back from a prepared model (the record's ``quant`` block).

A record describes the model that was evaluated, not the config it was asked for: PTQ replaces observers,
a deployment target narrows grids (:mod:`qat.targets`), overrides change single layers. Every weight and
activation quantizer is inspected; a field that is the same everywhere is reported once, a field that varies
as ``{"mixed": {value: count}}``. :func:`differences` lists where that departs from the config.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import nn

from qat.quant.fake_quant import FakeQuantize
from qat.quant.modules import QConvBnAct
from qat.quant.observers import OBSERVERS, EmaMinMaxObserver, PercentileObserver


def observer_name(observer: nn.Module) -> str:
    """The config name of an observer instance (``ema``, ``minmax``, ``mse``, ...)."""
    for name, cls in OBSERVERS.items():
        if type(observer) is cls:
            return name
    return "mse" if type(observer).__name__ == "MseObserver" else type(observer).__name__


def quantizer_name(fq: FakeQuantize) -> str:
    """The config name of what sets a quantizer's grid: its observer's, or ``lsq``/``lsq_plus`` for a learned step
    size (:mod:`qat.quant.lsq`)."""
    name = getattr(fq, "config_name", None)
    return name if isinstance(name, str) else observer_name(fq.observer)


def _summary(values: list[Any]) -> Any:
    counts = Counter(values)
    if len(counts) == 1:
        return values[0]
    return {"mixed": {str(k): n for k, n in sorted(counts.items(), key=lambda kv: str(kv[0]))}}


def quantizers(model: nn.Module) -> tuple[list[FakeQuantize], list[FakeQuantize]]:
    """(weight quantizers, activation quantizers) of a prepared model; weights observe in eval mode too."""
    weights, acts = [], []
    for module in model.modules():
        if isinstance(module, FakeQuantize):
            (weights if module.observe_in_eval else acts).append(module)
    return weights, acts


def describe(model: nn.Module, precision: str = "int8") -> dict[str, Any]:
    """The ``quant`` block of a record, from the quantizers of ``model``."""
    weights, acts = quantizers(model)
    block: dict[str, Any] = {"precision": precision, "weight_quantizers": len(weights), "act_quantizers": len(acts)}
    if weights:
        block.update({
            "weight_bits": _summary([q.spec.bits for q in weights]),
            "weight_per_channel": _summary([q.spec.per_channel for q in weights]),
            "weight_ch_axis": _summary([q.spec.ch_axis for q in weights if q.spec.per_channel] or [0]),
            "weight_symmetric": _summary([q.spec.symmetric for q in weights]),
            "weight_narrow_range": _summary([q.spec.narrow_range for q in weights]),
            "weight_observer": _summary([quantizer_name(q) for q in weights]),
        })
    folds = [m.bn_fold for m in model.modules() if isinstance(m, QConvBnAct) and m.bn is not None]
    if folds:
        block["bn_fold"] = _summary(folds)
    inputs = input_quantizers(model)
    inner = [q for q in acts if all(q is not i for i in inputs)]
    if inputs:
        block["input_bits"] = _summary([q.spec.bits for q in inputs])
    if acts:
        block.update({
            "act_bits": _summary([q.spec.bits for q in inner or acts]),
            "act_symmetric": _summary([q.spec.symmetric for q in acts]),
            "act_observer": _summary([quantizer_name(q) for q in acts]),
        })
        decays = [q.observer.decay for q in acts if isinstance(q.observer, EmaMinMaxObserver)]
        if decays:
            block["ema_decay"] = _summary(decays)
        percentiles = [round(q.observer.q * 100, 6) for q in acts if isinstance(q.observer, PercentileObserver)]
        if percentiles:
            block["percentile"] = _summary(percentiles)
    weight_inits = [q.init for q in weights if isinstance(getattr(q, "init", None), str)]
    act_inits = [q.init for q in acts if isinstance(getattr(q, "init", None), str)]
    if act_inits:
        block["step_init"] = _summary(act_inits)
    if weight_inits:
        block["weight_step_init"] = _summary(weight_inits)
    if weight_inits or act_inits:
        block["step_domain"] = _summary([q.domain for q in [*weights, *acts] if hasattr(q, "domain")])
        block["step_lr_scale"] = _summary([float(q.lr_scale) for q in [*weights, *acts] if hasattr(q, "lr_scale")])
    return block


def input_quantizers(model: nn.Module) -> list[FakeQuantize]:
    """The quantizers applied to the model's inputs (``quant.input_bits``): modules called directly on a
    placeholder of a prepared graph."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return []
    found = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        for user in node.users:
            module = model.get_submodule(str(user.target)) if user.op == "call_module" else None
            if isinstance(module, FakeQuantize):
                found.append(module)
    return found


def differences(ran: dict[str, Any], config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Keys whose value as it ran differs from the config: ``{key: {"config": c, "ran": r}}``."""
    return {key: {"config": config[key], "ran": value} for key, value in ran.items()
            if key in config and config[key] != value}
