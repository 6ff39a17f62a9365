"""Bit allocation by integer programming (Hubara et al. 2020 §4.1): exact optimum, budget, overrides."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from qat.errors import QatError
from qat.ptq.bit_allocation import allocate_bits, apply_bit_allocation, brute_force_bits, layer_costs, to_overrides
from qat.ptq.layers import quantized_layers
from qat.quant.config import LayerOverride, QuantConfig
from qat.quant.prepare import prepare


def _case(seed: int, layers: int = 6, bits: tuple[int, ...] = (2, 4, 8)) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    errors, costs = {}, {}
    for i in range(layers):
        size = float(torch.randint(10, 1000, (1,), generator=g))
        sensitivity = float(torch.rand(1, generator=g)) * 10
        # error falls with bits (≈ 4^-b) but with layer-specific noise, so greedy choices are not optimal
        errors[f"l{i}"] = {b: sensitivity * 4.0 ** (-b) * (1 + float(torch.rand(1, generator=g))) for b in bits}
        costs[f"l{i}"] = {b: size * b for b in bits}
    return errors, costs


def _total(table: dict, assignment: dict) -> float:
    return sum(table[name][bits] for name, bits in assignment.items())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.95])
def test_milp_matches_exhaustive_enumeration(seed: int, fraction: float) -> None:
    errors, costs = _case(seed)
    budget = fraction * sum(max(c.values()) for c in costs.values())
    chosen = allocate_bits(errors, costs, budget)
    best = brute_force_bits(errors, costs, budget)
    assert best is not None
    assert _total(costs, chosen) <= budget
    assert _total(errors, chosen) == pytest.approx(_total(errors, best), rel=1e-9)


def test_hand_made_case_picks_the_known_optimum() -> None:
    # budget 36: a (big, sensitive) keeps 8 bits, and of b and c only c (the more sensitive) can also keep 8
    errors = {"a": {4: 10.0, 8: 1.0}, "b": {4: 2.0, 8: 1.5}, "c": {4: 3.0, 8: 0.5}}
    costs = {"a": {4: 12.0, 8: 24.0}, "b": {4: 4.0, 8: 8.0}, "c": {4: 4.0, 8: 8.0}}
    every = [dict(zip("abc", combo, strict=True)) for combo in itertools.product((4, 8), repeat=3)]
    feasible = [a for a in every if _total(costs, a) <= 36.0]
    expected = min(feasible, key=lambda a: _total(errors, a))
    assert expected == {"a": 8, "b": 4, "c": 8}  # total error 3.5, cost exactly 36
    assert allocate_bits(errors, costs, 36.0) == expected
    assert allocate_bits(errors, costs, 48.0) == {"a": 8, "b": 8, "c": 8}
    assert allocate_bits(errors, costs, 20.0) == {"a": 4, "b": 4, "c": 4}


def test_infeasible_budget_is_a_clear_error() -> None:
    errors, costs = _case(0)
    with pytest.raises(QatError, match="ptq.bit_allocation_budget: the budget .* is below the smallest"):
        allocate_bits(errors, costs, 1.0)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


@pytest.mark.parametrize("metric", ["size", "bops"])
def test_allocation_on_a_model_respects_the_budget_and_gives_usable_overrides(metric: str) -> None:
    torch.set_num_threads(1)
    net = _net()
    existing = [LayerOverride("3", act_bits=6)]
    q = prepare(net, QuantConfig(overrides=existing), torch.zeros(1, 3, 16, 16))
    images = torch.randn(16, 3, 16, 16)
    report = apply_bit_allocation(q, images, budget_fraction=0.7, bit_choices=[4, 8], metric=metric)
    costs = layer_costs(q, images[:1], [4, 8], metric, 8)
    assignment = report["assignment"]
    assert report["cost"] == sum(costs[n][b] for n, b in assignment.items()) <= report["budget"]
    assert report["budget"] == pytest.approx(0.7 * sum(c[8] for c in costs.values()))
    assert set(assignment.values()) == {4, 8}  # 0.7 of the widest cost forces a mix
    for name, layer in quantized_layers(q):
        assert layer.weight_fq.spec.bits == assignment[name]
    # the overrides rebuild the same model from the float network, the earlier act override kept
    overrides = [LayerOverride(**o) for o in report["overrides"]]
    assert q.qat_config.overrides[: len(overrides)] == overrides
    again = prepare(net, QuantConfig(overrides=overrides + existing), torch.zeros(1, 3, 16, 16))
    for name, layer in quantized_layers(again):
        assert layer.weight_fq.spec.bits == assignment[name]
    assert next(o for o in overrides if o.pattern == "3").act_bits == 6


def test_to_overrides_uses_exact_layer_names() -> None:
    out = to_overrides({"features.1.conv.0.0": 4}, [LayerOverride("features.*", act_bits=6)])
    assert out == [LayerOverride("features.1.conv.0.0", weight_bits=4, act_bits=6)]
