"""Per-layer bit allocation by integer programming (Hubara et al. 2020 §4.1, eq. 6).

Each quantized layer l picks one weight width b from a configured set. Its accuracy cost is measured:
e_l(b) = MSE between the network's output with only layer l's weights quantized at b bits and the float
output, on the calibration images (the additive, per-layer degradation that Hubara et al. assume for ΔL).
Under a budget on the model size (Σ params_l · b_l) or bit operations (Σ MACs_l · b_l · a_bits), the
assignment minimizing Σ_l e_l(b_l) is found exactly by ``scipy.optimize.milp`` (binary x_{l,b}, one width per
layer). The result is a list of :class:`LayerOverride` patterns usable in a QuantConfig.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import replace

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from qat.errors import QatError
from qat.ptq.layers import batches, float_reference, layer_macs, quantized_layers, weight_of
from qat.quant.config import LayerOverride, QuantConfig
from qat.quant.fake_quant import FakeQuantize
from qat.quant.observers import make_observer


def allocate_bits(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, float]],
                  budget: float) -> dict[str, int]:
    """argmin Σ errors[l][b_l] subject to Σ costs[l][b_l] <= budget, exactly (mixed-integer program)."""
    names = list(errors)
    options = [(name, bits) for name in names for bits in sorted(errors[name])]
    if not options:
        raise QatError("ptq.bit_allocation_budget", "there is no quantized layer to allocate bits to",
                       "prepare a model with conv or linear layers")
    minimum = sum(min(costs[name].values()) for name in names)
    if minimum > budget * (1 + 1e-12):
        raise QatError("ptq.bit_allocation_budget", f"the budget {budget:.6g} is below the smallest possible "
                       f"cost {minimum:.6g} (every layer at its narrowest width)",
                       "raise the budget or add a narrower width to ptq.bit_choices")
    err = np.array([errors[n][b] for n, b in options], dtype=np.float64)
    err = err / max(float(np.abs(err).max()), 1e-300)  # well-scaled objective for the solver
    cost = np.array([costs[n][b] for n, b in options], dtype=np.float64) / budget
    one_each = np.array([[1.0 if n == name else 0.0 for n, _ in options] for name in names])
    constraints = [LinearConstraint(one_each, 1.0, 1.0), LinearConstraint(cost[None, :], -np.inf, 1.0)]
    result = milp(err, constraints=constraints, integrality=np.ones(len(options)), bounds=Bounds(0.0, 1.0),
                  options={"mip_rel_gap": 0.0})
    if result.status != 0 or result.x is None:
        raise QatError("ptq.bit_allocation_budget", f"the integer program failed: {result.message}",
                       "raise the budget")
    chosen = {name: bits for (name, bits), x in zip(options, result.x, strict=True) if x > 0.5}
    return chosen


def brute_force_bits(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, float]],
                     budget: float) -> dict[str, int] | None:
    """The same optimum by enumerating every assignment (for checking small cases)."""
    names = list(errors)
    best, best_err = None, float("inf")
    for combo in itertools.product(*(sorted(errors[n]) for n in names)):
        if sum(costs[n][b] for n, b in zip(names, combo, strict=True)) > budget * (1 + 1e-12):
            continue
        total = sum(errors[n][b] for n, b in zip(names, combo, strict=True))
        if total < best_err:
            best, best_err = dict(zip(names, combo, strict=True)), total
    return best


def layer_costs(model: nn.Module, example: torch.Tensor, bit_choices: list[int], metric: str,
                act_bits: int) -> dict[str, dict[int, float]]:
    """Cost of each layer at each width: weight bits (``size``) or MACs·w_bits·a_bits (``bops``)."""
    macs = layer_macs(model, example) if metric == "bops" else {}
    out = {}
    for name, layer in quantized_layers(model):
        n = weight_of(layer).numel()
        out[name] = {b: float(n * b) if metric == "size" else float(macs[name] * b * act_bits) for b in bit_choices}
    return out


def _weight_quantizer(config: QuantConfig, bits: int, observer: str) -> FakeQuantize:
    spec = config.weight_spec(bits)
    return FakeQuantize(spec, make_observer(observer, per_channel=spec.per_channel, ch_axis=spec.ch_axis,
                                            key="ptq.bit_allocation", spec=spec, weights=True),
                        observe_in_eval=True)


@torch.no_grad()
def measure_sensitivity(model: nn.Module, images: torch.Tensor, bit_choices: list[int], weight_observer: str,
                        batch_size: int = 64) -> dict[str, dict[int, float]]:
    """e_l(b): output MSE against the float network with only layer l's weights quantized at b bits."""
    config = _config_of(model)
    float_net = float_reference(model)
    outputs = [float_net(chunk) for chunk in batches(images, batch_size)]
    errors: dict[str, dict[int, float]] = {}
    for name, layer in quantized_layers(float_net):
        original = layer.weight_fq
        errors[name] = {}
        for bits in bit_choices:
            fq = _weight_quantizer(config, bits, weight_observer)
            fq(layer.folded_weight_and_bias()[0])
            fq.observing = False
            layer.weight_fq = fq
            total = sum((float_net(chunk) - ref).square().sum().item()
                        for chunk, ref in zip(batches(images, batch_size), outputs, strict=True))
            errors[name][bits] = total / sum(o.numel() for o in outputs)
        layer.weight_fq = original
    return errors


def _config_of(model: nn.Module) -> QuantConfig:
    config = getattr(model, "qat_config", None)
    if not isinstance(config, QuantConfig):
        raise QatError("ptq", "the model carries no QuantConfig", "prepare it with qat.quant.prepare.prepare")
    return config


def to_overrides(assignment: dict[str, int], existing: list[LayerOverride]) -> list[LayerOverride]:
    """One exact-name override per layer, keeping the activation width of an existing matching override.

    They go before ``existing`` in QuantConfig.overrides (the first matching override wins in prepare).
    """
    out = []
    for name, bits in assignment.items():
        match = next((o for o in existing if fnmatch.fnmatchcase(name, o.pattern)), None)
        out.append(LayerOverride(pattern=name, weight_bits=bits, act_bits=match.act_bits if match else None))
    return out


def apply_bit_allocation(model: nn.Module, images: torch.Tensor, *, budget_fraction: float, bit_choices: list[int],
                         metric: str = "size", weight_observer: str = "current") -> dict[str, object]:
    """Measure, solve and install the per-layer weight widths in ``model`` (before calibration)."""
    config = _config_of(model)
    costs = layer_costs(model, images[:1], bit_choices, metric, config.act_bits)
    widest = sum(max(c.values()) for c in costs.values())
    budget = budget_fraction * widest
    errors = measure_sensitivity(model, images, bit_choices, weight_observer)
    assignment = allocate_bits(errors, costs, budget)
    for name, layer in quantized_layers(model):
        layer.weight_fq = _weight_quantizer(config, assignment[name], weight_observer)
    overrides = to_overrides(assignment, config.overrides)
    model.qat_config = replace(config, overrides=overrides + list(config.overrides))
    used = sum(costs[name][bits] for name, bits in assignment.items())
    return {"metric": metric, "budget": budget, "budget_fraction": budget_fraction, "cost": used,
            "widest_cost": widest, "assignment": assignment, "proxy_error": sum(
                errors[n][b] for n, b in assignment.items()), "sensitivity": errors,
            "overrides": [{"pattern": o.pattern, "weight_bits": o.weight_bits, "act_bits": o.act_bits}
                          for o in overrides]}
