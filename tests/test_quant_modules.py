"""Batch-norm folding modes, observers and the step schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qat.quant.config import QuantConfig
from qat.quant.fake_quant import FakeQuantize
from qat.quant.modules import QConvBnAct
from qat.quant.observers import EmaMinMaxObserver
from qat.quant.prepare import prepare
from qat.quant.schedule import QuantSchedule


class ConvBnRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU6()
        self.conv2 = nn.Conv2d(8, 4, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn(self.conv(x)))))


def _float_reference() -> nn.Module:
    torch.manual_seed(0)
    model = ConvBnRelu()
    with torch.no_grad():  # non-trivial BN parameters and statistics
        for bn in (model.bn, model.bn2):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return model


def _quantization_off(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, FakeQuantize):
            m.quantizing = False


@pytest.mark.parametrize("mode", ["jacob", "whitepaper", "unfolded"])
def test_bn_fold_equals_float_network_when_quantization_is_off(mode: str) -> None:
    reference = _float_reference()
    x = torch.randn(6, 3, 10, 10)
    prepared = prepare(reference, QuantConfig(bn_fold=mode), x[:1])
    _quantization_off(prepared)
    for training in (True, True, False):  # two training steps (running stats move), then eval
        reference.train(training)
        prepared.train(training)
        expected = reference(x)
        got = prepared(x)
        assert torch.allclose(got, expected, atol=1e-5), (mode, training, (got - expected).abs().max())
    fused = [m for m in prepared.modules() if isinstance(m, QConvBnAct)]
    assert len(fused) == 2 and fused[0].activation == "relu6"
    assert torch.allclose(fused[0].bn.running_mean, reference.bn.running_mean, atol=1e-6)
    assert torch.allclose(fused[0].bn.running_var, reference.bn.running_var, atol=1e-5)


@pytest.mark.parametrize("mode", ["jacob", "whitepaper"])
def test_bn_fold_gradients_match_float_network(mode: str) -> None:
    """Same gradients as conv -> BN in training mode (float64: BN backward amplifies float32 rounding)."""
    reference = _float_reference().train().double()
    x = torch.randn(6, 3, 10, 10, dtype=torch.float64)
    prepared = prepare(copy.deepcopy(reference), QuantConfig(bn_fold=mode), x[:1]).train()
    _quantization_off(prepared)
    reference(x).square().sum().backward()
    prepared(x).square().sum().backward()
    ref_grad = reference.conv.weight.grad
    fused = next(m for m in prepared.modules() if isinstance(m, QConvBnAct))
    assert torch.allclose(fused.conv.weight.grad, ref_grad, atol=1e-10)


@pytest.mark.parametrize("mode", ["jacob", "whitepaper", "unfolded"])
def test_bn_freeze_uses_running_statistics(mode: str) -> None:
    """A frozen BN (schedule.bn_freeze_step) normalises with its running statistics and leaves them alone, in
    every fold mode (the unfolded one used batch statistics before)."""
    reference = _float_reference()
    x = torch.randn(6, 3, 10, 10)
    prepared = prepare(reference, QuantConfig(bn_fold=mode), x[:1]).train()
    _quantization_off(prepared)
    QuantSchedule(bn_freeze_step=0).apply(prepared, 0)
    for m in prepared.modules():
        if isinstance(m, FakeQuantize):
            m.quantizing = False
    running = {k: v.clone() for k, v in prepared.state_dict().items() if "running" in k}
    reference.eval()
    assert torch.allclose(prepared(x), reference(x), atol=1e-5)
    assert all(torch.equal(v, prepared.state_dict()[k]) for k, v in running.items())


def test_ema_observer_follows_jacob_update() -> None:
    obs = EmaMinMaxObserver(decay=0.9)
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([-3.0, 4.0]))
    assert obs.min_val.item() == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert obs.max_val.item() == pytest.approx(0.9 * 2 + 0.1 * 4)


def test_schedule_switches_fire_at_exact_steps() -> None:
    model = prepare(_float_reference(), QuantConfig(), torch.randn(1, 3, 8, 8))
    sched = QuantSchedule(weight_quant_delay=3, act_quant_delay=5, bn_freeze_step=7, range_freeze_step=9)
    weight_fq = next(m for m in model.modules() if isinstance(m, QConvBnAct)).weight_fq
    act_fq = model.get_submodule("act_quant.x")
    seen = []
    for step in range(11):
        sched.apply(model, step)
        fused = next(m for m in model.modules() if isinstance(m, QConvBnAct))
        seen.append((weight_fq.quantizing, act_fq.quantizing, fused.bn_frozen, not act_fq.observing))
    assert [s[0] for s in seen].index(True) == 3
    assert [s[1] for s in seen].index(True) == 5
    assert [s[2] for s in seen].index(True) == 7
    assert [s[3] for s in seen].index(True) == 9
    assert seen[10] == (True, True, True, True)


def test_schedule_state_survives_save_and_resume() -> None:
    x = torch.randn(4, 3, 8, 8)
    sched = QuantSchedule(act_quant_delay=2, bn_freeze_step=3)
    model = prepare(_float_reference(), QuantConfig(), x[:1]).train()
    for step in range(4):
        sched.apply(model, step)
        model(x)
    state = copy.deepcopy(model.state_dict())
    resumed = prepare(_float_reference(), QuantConfig(), x[:1]).train()
    resumed.load_state_dict(state)
    sched.apply(resumed, 4)
    sched.apply(model, 4)
    model.eval()
    resumed.eval()
    assert torch.equal(model(x), resumed(x))
    act = resumed.get_submodule("act_quant.x")
    assert act.quantizing and act.observer.initialized
