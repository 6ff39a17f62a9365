"""Learned step sizes (issue 20): LSQ's and LSQ+'s gradients (Esser et al. 2020 eq. 3, Bhalgat et al. 2020),
initialisation, optimizer groups, checkpoints and conversion to the integer model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from qat.errors import QatError
from qat.intmodel import reference
from qat.intmodel.convert import convert
from qat.quant.config import QuantConfig
from qat.quant.describe import describe
from qat.quant.lsq import MIN_STEP, LearnedStepFunction, LearnedStepQuantize, positive_extent, step_parameters
from qat.quant.prepare import calibration_mode, prepare
from qat.quant.schedule import QuantSchedule
from qat.quant.scheme import QuantSpec
from qat.train.loop import OptimConfig, build_optimizer


def test_step_gradient_matches_a_finite_difference_of_the_straight_through_surrogate() -> None:
    """Eq. 3 is the derivative of S·(q(S) − Z) where, at the S the forward used, a value inside the grid has
    q(S) = v/S + c with c = round(v/S) − v/S held fixed (the straight-through estimator) and a clipped one has q
    fixed at qmin or qmax: a finite difference of that surrogate in float64 checks the formula."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, generator=g, dtype=torch.float64).float() * 3
    s0, z, qmin, qmax = 0.37, 5.0, 0, 15
    c = (torch.round(x.double() / s0) - x.double() / s0)
    codes = torch.round(x.double() / s0) + z
    inside = (codes >= qmin) & (codes <= qmax)
    assert inside.any() and (~inside).any()  # both branches of eq. 3 are exercised

    def surrogate(s: float) -> torch.Tensor:
        return s * (torch.where(inside, x.double() / s + c + z, codes.clamp(qmin, qmax)) - z)

    h = 1e-6
    numeric = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    scale = torch.tensor(s0, requires_grad=True)
    out = LearnedStepFunction.apply(x, scale, torch.tensor(z), qmin, qmax, 1.0, ())
    weights = torch.randn(500, generator=g)
    (out * weights).sum().backward()
    expected = float((numeric * weights.double()).sum())
    assert scale.grad is not None and float(scale.grad) == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("per_channel", [False, True])
def test_gradients_equal_torchs_learnable_fake_quantize(per_channel: bool) -> None:
    """torch's own LSQ op (``_fake_quantize_learnable_*``, its peer) gives the same output and gradients."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 5, 5, generator=g) * 2
    grad = torch.randn_like(x)
    factor = 1 / math.sqrt(x.numel() * 15)
    if per_channel:
        scale = torch.rand(4, generator=g) * 0.2 + 0.05
        zero = torch.randint(0, 16, (4,), generator=g).float()
        peer = torch._fake_quantize_learnable_per_channel_affine
        args: tuple = (1, 0, 15, factor)
        shape: tuple = (1, -1, 1, 1)
    else:
        scale, zero = torch.tensor([0.13]), torch.tensor([6.0])
        peer = torch._fake_quantize_learnable_per_tensor_affine
        args, shape = (0, 15, factor), ()
    ours = [t.clone().requires_grad_() for t in (x, scale, zero)]
    theirs = [t.clone().requires_grad_() for t in (x, scale, zero)]
    s, z = (ours[1], ours[2]) if per_channel else (ours[1].reshape(()), ours[2].reshape(()))
    out = LearnedStepFunction.apply(ours[0], s, z, 0, 15, factor, shape)
    expected = peer(*theirs, *args)
    assert torch.equal(out, expected)
    out.backward(grad)
    expected.backward(grad)
    for mine, peer_t in zip(ours, theirs, strict=True):
        assert mine.grad is not None and peer_t.grad is not None
        torch.testing.assert_close(mine.grad, peer_t.grad, rtol=1e-5, atol=1e-6)


def _prepared(act: str = "lsq", weight: str = "lsq", bits: int = 4, lr_scale: float = 1.0,
              **config_keys: str) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    config = QuantConfig(weight_bits=bits, act_bits=bits, act_observer=act, weight_observer=weight,
                         step_lr_scale=lr_scale, **config_keys)
    return prepare(model, config, torch.randn(1, 3, 32, 32))


def _calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with calibration_mode(model), torch.no_grad():
        for x in batches:
            model(x)


def test_initialisation_by_step_init() -> None:
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]
    spec = QuantSpec(bits=4)
    lsq = LearnedStepQuantize(spec, "lsq", init="lsq")
    plus = LearnedStepQuantize(spec, "lsq_plus", init="minmax")
    mse = LearnedStepQuantize(spec, "lsq_plus", init="mse")  # MSE-optimal ranges (LSQ+ §3.3)
    for fq in (lsq, plus, mse):
        fq.train()
        fq.calibrating = True
        for x in batches:
            fq(x)
    mean_abs = sum(x.abs().mean() for x in batches) / 3
    assert float(lsq.scale) == pytest.approx(float(2 * mean_abs / math.sqrt(positive_extent(spec))), rel=1e-6)
    low, high = min(float(x.min()) for x in batches), max(float(x.max()) for x in batches)
    assert float(plus.scale) == pytest.approx((high - low) / 15, rel=1e-6)
    assert int(plus.zero_point) == round(-low / ((high - low) / 15)) and plus.offset.requires_grad
    assert not lsq.offset.requires_grad
    assert 0 < float(mse.scale) < float(plus.scale)  # clipped: a finer step than min/max


def test_log_domain_steps_stay_positive_with_the_chain_rule_gradient() -> None:
    """``quant.step_domain=log``: the parameter is ln S; its gradient is S times the linear one (LSQ's, scaled by
    g), and a descent step that drives a linear step size past zero only shrinks the log one by a ratio."""
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    direction = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    quantizers = {domain: LearnedStepQuantize(QuantSpec(bits=4), "lsq_plus", domain=domain).train()
                  for domain in ("linear", "log")}
    for fq in quantizers.values():
        fq.calibrating = True
        fq(x)
        fq.calibrating = False
        (fq(x) * direction).sum().backward()
    linear, log = quantizers["linear"], quantizers["log"]
    assert torch.allclose(log.scale, linear.scale) and torch.allclose(log.step, linear.step.log())
    assert torch.allclose(log.step.grad, linear.step.grad * linear.scale.detach(), rtol=1e-5)
    lr = 2 * float(linear.step) / float(linear.step.grad.abs())  # twice what takes the linear step to zero
    shrink = linear.step.grad.sign()  # the direction of the gradient that shrinks the step
    with torch.no_grad():
        for fq in quantizers.values():
            fq.step -= lr * fq.step.grad * shrink
    assert float(linear.step) < 0 and float(linear.scale) == pytest.approx(MIN_STEP)  # collapsed to the floor
    assert 0 < float(log.scale) != float(linear.scale)
    assert describe(_prepared(step_domain="log"))["step_domain"] == "log"
    with pytest.raises(QatError, match="quant.step_domain"):
        QuantConfig(step_domain="exp")


def test_weights_and_activations_start_from_their_own_step_init() -> None:
    """``quant.weight_step_init`` (null: ``step_init``) initialises the weights' learned steps, ``step_init`` the
    activations'; the record reads both back from the model."""
    split = _prepared(act="lsq_plus", step_init="mse", weight_step_init="minmax")
    assert {m.init for m in split.modules() if isinstance(m, LearnedStepQuantize) and m.observe_in_eval} == {"minmax"}
    assert {m.init for m in split.modules() if isinstance(m, LearnedStepQuantize) and not m.observe_in_eval} == {"mse"}
    assert (describe(split)["step_init"], describe(split)["weight_step_init"]) == ("mse", "minmax")
    same = describe(_prepared(step_init="lsq"))
    assert (same["step_init"], same["weight_step_init"]) == ("lsq", "lsq")
    with pytest.raises(QatError, match="quant.weight_step_init"):
        QuantConfig(weight_step_init="max")

def test_weights_are_per_channel_and_bad_settings_name_their_key() -> None:
    model = _prepared()
    _calibrate(model, [torch.randn(2, 3, 32, 32)])
    weight = model.conv1.weight_fq if hasattr(model, "conv1") else None
    fqs = [m for m in model.modules() if isinstance(m, LearnedStepQuantize) and m.observe_in_eval]
    assert fqs and all(fq.step.shape == (fq.observer.min_val.numel(),) for fq in fqs)
    assert weight is None or weight.step.numel() == 64
    assert describe(model)["weight_observer"] == "lsq" and describe(model)["act_observer"] == "lsq"
    assert describe(model)["step_lr_scale"] == 1.0 and describe(_prepared(lr_scale=0.01))["step_lr_scale"] == 0.01
    with pytest.raises(QatError, match="quant.weight_observer: lsq_plus"):
        QuantConfig(weight_observer="lsq_plus")
    with pytest.raises(QatError, match="quant.weight_observer: lsq for weights needs a symmetric grid"):
        QuantConfig(weight_observer="lsq", weight_symmetric=False)
    with pytest.raises(QatError, match="quant.step_lr_scale"):
        QuantConfig(act_observer="lsq", step_lr_scale=0)


def test_step_sizes_have_their_own_group_without_weight_decay() -> None:
    model = _prepared(act="lsq_plus", lr_scale=0.1)
    _calibrate(model, [torch.randn(2, 3, 32, 32)])
    optimizer = build_optimizer(model, OptimConfig(lr=0.5, weight_decay=1e-4))
    learned = {id(p) for p, _ in step_parameters(model)}
    groups = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & learned]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == learned
    assert groups[0]["weight_decay"] == 0.0 and groups[0]["lr_scale"] == 0.1 and groups[0]["lr"] == pytest.approx(0.05)
    others = [p for g in optimizer.param_groups if g is not groups[0] for p in g["params"]]
    assert not {id(p) for p in others} & learned
    # the learned parameters train: one SGD step moves every step size that got a gradient
    before = [p.detach().clone() for p, _ in step_parameters(model)]
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    moved = [not torch.equal(b, p) for b, (p, _) in zip(before, step_parameters(model), strict=True)]
    assert sum(moved) > len(moved) // 2


def test_checkpoint_round_trip_restores_every_step_size() -> None:
    model = _prepared(act="lsq_plus")
    _calibrate(model, [torch.randn(2, 3, 32, 32)])
    with torch.no_grad():
        for p, _ in step_parameters(model):
            p.mul_(1.1)
    fresh = _prepared(act="lsq_plus")
    fresh.load_state_dict(model.state_dict())
    for (a, _), (b, _) in zip(step_parameters(model), step_parameters(fresh), strict=True):
        assert torch.equal(a, b) and b.requires_grad
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_range_freeze_stops_learning() -> None:
    model = _prepared()
    _calibrate(model, [torch.randn(2, 3, 32, 32)])
    model.train()
    for fq in model.modules():
        if isinstance(fq, LearnedStepQuantize):
            fq.observing = False
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p, _ in step_parameters(model))


def _separable_task(classes: int = 4, res: int = 32):  # type: ignore[no-untyped-def]
    """Batches of a synthetic task a small network learns in a few steps (class = fixed pattern + noise): confident
    logits as after training (untrained networks' near-tied logits flip under any 1-LSB difference)."""
    patterns = torch.randn(classes, 3, res, res, generator=torch.Generator().manual_seed(0))

    def batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=gen)
        return patterns[y] + torch.randn(n, 3, res, res, generator=gen), y

    return batch


@pytest.mark.parametrize("act", ["lsq", "lsq_plus"])
def test_converted_model_agrees_with_its_simulation(act: str) -> None:
    """A float-trained MobileNet v2, LSQ QAT steps (every S and offset moves), then the integer model: the
    reference predicts as the simulation on >= 99% of 256 images."""
    from qat.models.registry import build_model

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    batch = _separable_task()
    model = build_model("mobilenet_v2", width_mult=0.35, num_classes=4, resolution=32)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(30):
        x, y = batch(32, g)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    config = QuantConfig(act_observer=act, weight_observer="lsq")
    prepared = prepare(model, config, torch.randn(1, 3, 32, 32))
    _calibrate(prepared, [batch(32, g)[0] for _ in range(2)])
    QuantSchedule().apply(prepared, 0)  # the default schedule: folded with the running statistics from step 0
    prepared.train()
    before = [p.detach().clone() for p, _ in step_parameters(prepared)]
    qat_optimizer = build_optimizer(prepared, OptimConfig(lr=0.005))
    for _ in range(5):
        x, y = batch(32, g)
        nn.functional.cross_entropy(prepared(x), y).backward()
        qat_optimizer.step()
        qat_optimizer.zero_grad()
    moved = sum(not torch.equal(b, p) for b, (p, _) in zip(before, step_parameters(prepared), strict=True))
    assert moved > len(before) // 2
    prepared.eval()
    integer = reference.build(convert(copy.deepcopy(prepared)), rounding="single")
    agree = []
    for _ in range(4):
        x, _ = batch(64, g)
        with torch.no_grad():
            agree.append((prepared(x).argmax(1) == integer(x).argmax(1)).float().mean())
    assert float(torch.stack(agree).mean()) >= 0.99


def test_descent_on_a_reconstruction_loss_reaches_the_mse_optimal_step() -> None:
    """With the loss ||v̂ − v||², LSQ's gradient drives S from the min/max step to the MSE-optimal one
    (Choukroun's search of qat.quant.mse, within 1%): the gradient points where it should."""
    from qat.quant.mse import mse_optimal_range

    torch.manual_seed(0)
    x = torch.randn(100_000)
    spec = QuantSpec(bits=4, signed=True, symmetric=True, narrow_range=True)
    step = torch.tensor(float(x.abs().max()) / spec.qmax, requires_grad=True)
    optimizer = torch.optim.SGD([step], lr=0.01)
    factor = 1 / math.sqrt(x.numel() * positive_extent(spec))
    for _ in range(150):
        out = LearnedStepFunction.apply(x, step, torch.tensor(0.0), spec.qmin, spec.qmax, factor, ())
        optimizer.zero_grad()
        ((out - x) ** 2).sum().backward()
        optimizer.step()
    low, high = mse_optimal_range(x.reshape(1, -1), spec)
    optimal = float(torch.maximum(-low, high)[0]) / spec.qmax
    assert float(step.detach()) == pytest.approx(optimal, rel=0.01)
    assert float(x.abs().max()) / spec.qmax > 1.3 * optimal  # it did move: min/max is far from the optimum


def test_a_collapsed_weight_step_has_no_integer_form_named_by_its_layer() -> None:
    """A learned weight step pushed below zero (floored at MIN_STEP) puts that channel's int32 bias b/(S_in·S_w)
    beyond int32: conversion says so, naming the layer, instead of saturating the bias (measured on lsq_demo:
    engines then disagreed with the simulation on up to 41% of images)."""
    from test_reference import MODELS, calibrated

    from qat.errors import NoIntegerForm
    from qat.intmodel.convert import convert

    prepared, _ = calibrated(MODELS["tiny"], QuantConfig(weight_observer="lsq"), n=4)
    convert(prepared)  # converts as calibrated
    first = next(m for m in prepared.modules() if isinstance(getattr(m, "weight_fq", None), LearnedStepQuantize))
    with torch.no_grad():
        first.weight_fq.step[0] = -0.01
        bn = getattr(first, "bn", None)
        (bn.bias if bn is not None else first.conv.bias).fill_(5.0)  # a bias the collapsed step must carry
    with pytest.raises(NoIntegerForm, match=r"^convert: layer \w+: its int32 bias b/\(S_in·S_w\) reaches"):
        convert(prepared)
