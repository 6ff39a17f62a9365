"""The fewer-kernel EMA fake-quant path (qat.quant.fused) equals the unfused path bit for bit (Jacob §3.1, eq. 12)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from qat.errors import QatError
from qat.quant import fused
from qat.quant.config import QuantConfig
from qat.quant.fake_quant import FakeQuantize
from qat.quant.observers import EmaMinMaxObserver, MinMaxObserver
from qat.quant.prepare import prepare
from qat.quant.scheme import QuantSpec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the lead's GPU run covers cuda too
SPECS = [
    QuantSpec(bits=8),
    QuantSpec(bits=8, signed=True),
    QuantSpec(bits=8, signed=True, symmetric=True),
    QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True),
    QuantSpec(bits=4),
    QuantSpec(bits=4, signed=True),
    QuantSpec(bits=4, signed=True, symmetric=True),
    QuantSpec(bits=8, narrow_range=True),
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class _Counter:
    """Counts calls to fused.ema_fake_quantize, proving the fused path actually ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        inner = fused.ema_fake_quantize

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls += 1
            return inner(*args, **kwargs)

        monkeypatch.setattr(fused, "ema_fake_quantize", counted)


def _inputs(device: str) -> list[torch.Tensor]:
    """Batches whose ranges move: zeros (eps scale), post-ReLU, all-negative, shifted, wide and narrow."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.zeros(2, 3, 5, 5)]
    for i in range(24):
        x = torch.randn(2, 3, 5, 5, generator=g) * (0.1 + 3.0 * (i % 5)) + (i % 7 - 3) * 0.7
        if i % 4 == 1:
            x = x.relu()
        if i % 6 == 2:
            x = -x.abs() - 0.5
        batches.append(x)
    return [b.to(device) for b in batches]


def _assert_same_state(a: FakeQuantize, b: FakeQuantize) -> None:
    for name in ("scale", "zero_point"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb), name
    for name in ("min_val", "max_val"):
        ta, tb = getattr(a.observer, name), getattr(b.observer, name)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb), name


def _step(fq: FakeQuantize, x: torch.Tensor, unfused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    if unfused:
        with fused.unfused_path():
            out = fq(x)
    else:
        out = fq(x)
    (out * torch.linspace(-1, 2, out.numel(), device=x.device).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{'s' if s.signed else 'u'}"
                         f"{'-sym' if s.symmetric else ''}{'-narrow' if s.narrow_range else ''}")
def test_fused_equals_unfused_over_the_schedule(spec: QuantSpec, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _Counter(monkeypatch)
    reference = FakeQuantize(spec, EmaMinMaxObserver(decay=0.9)).to(device).train()
    candidate = copy.deepcopy(reference)
    batches = _inputs(device)
    phases = [  # (observing, quantizing, training) per step, first observation included
        *[(True, True, True)] * 12, *[(True, False, True)] * 3, *[(False, True, True)] * 3,
        *[(True, True, False)] * 3, *[(True, True, True)] * 4,
    ]
    for (observing, quantizing, training), x in zip(phases, batches, strict=True):
        for fq in (reference, candidate):
            fq.observing, fq.quantizing = observing, quantizing
            fq.train(training)
        out_ref, grad_ref = _step(reference, x, unfused=True)
        out, grad = _step(candidate, x, unfused=False)
        assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref)
        _assert_same_state(candidate, reference)
    assert counter.calls == len(phases)
    assert reference.observer.initialized and int(reference.zero_point) in range(spec.qmin, spec.qmax + 1)


TIES = [  # ranges where qmin - min/S computed in float32 and in double round to different zero points
    (QuantSpec(bits=8), -3.2323153018951416, 3.08370304107666),
    (QuantSpec(bits=8), -1.4879529476165771, 0.3584120273590088),
    (QuantSpec(bits=8, signed=True), -0.41815805435180664, 0.027062416076660156),
    (QuantSpec(bits=4), -2.874741792678833, 0.319415807723999),
]


@pytest.mark.parametrize("spec, low, high", TIES)
def test_zero_point_rounds_in_float32_like_the_unfused_path(spec: QuantSpec, low: float, high: float) -> None:
    """The private torch fused op computes Z in double; on these ranges that gives another zero point."""
    x = torch.tensor([low, 0.1 * low, high])
    scale = (torch.tensor(high) - torch.tensor(low)) / float(spec.qmax - spec.qmin)
    in_double = round(spec.qmin - low / float(scale))
    reference = FakeQuantize(spec, EmaMinMaxObserver()).train()
    candidate = copy.deepcopy(reference)
    out_ref, grad_ref = _step(reference, x, unfused=True)
    out, grad = _step(candidate, x, unfused=False)
    assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref)
    _assert_same_state(candidate, reference)
    assert int(candidate.zero_point) != in_double


def test_range_warmup_before_quantization_and_checkpoints_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """quantizing=False from the first step (act_quant_delay), then a checkpoint written by one path resumes
    identically in the other."""
    counter = _Counter(monkeypatch)
    spec = QuantSpec(bits=8)
    reference = FakeQuantize(spec, EmaMinMaxObserver()).train()
    reference.quantizing = False
    candidate = copy.deepcopy(reference)
    batches = _inputs("cpu")
    for x in batches[:6]:
        out_ref, _ = _step(reference, x, unfused=True)
        out, _ = _step(candidate, x, unfused=False)
        assert torch.equal(out, x) and torch.equal(out_ref, x)
        _assert_same_state(candidate, reference)
    resumed_unfused = FakeQuantize(spec, EmaMinMaxObserver()).train()
    resumed_unfused.load_state_dict(candidate.state_dict())
    resumed_fused = FakeQuantize(spec, EmaMinMaxObserver()).train()
    resumed_fused.load_state_dict(reference.state_dict())
    for x in batches[6:12]:
        out_ref, grad_ref = _step(resumed_unfused, x, unfused=True)
        out, grad = _step(resumed_fused, x, unfused=False)
        assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref)
        _assert_same_state(resumed_fused, resumed_unfused)
    assert counter.calls == 12


def test_fused_path_applies_only_where_it_is_exact() -> None:
    x = torch.randn(4)
    assert fused.applies(FakeQuantize(QuantSpec(), EmaMinMaxObserver()), x)
    assert not fused.applies(FakeQuantize(QuantSpec(), MinMaxObserver()), x)
    assert not fused.applies(FakeQuantize(QuantSpec(per_channel=True), EmaMinMaxObserver(per_channel=True)), x)
    assert not fused.applies(FakeQuantize(QuantSpec(), EmaMinMaxObserver()), x.double())
    with fused.unfused_path():
        assert not fused.applies(FakeQuantize(QuantSpec(), EmaMinMaxObserver()), x)
    assert fused.ENABLED


def test_environment_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fused.ENV_VAR, "1")
    assert fused._enabled_from_env() is False
    monkeypatch.setenv(fused.ENV_VAR, "0")
    assert fused._enabled_from_env() is True
    monkeypatch.setenv(fused.ENV_VAR, "yes")
    with pytest.raises(QatError, match=fused.ENV_VAR):
        fused._enabled_from_env()


def _train_steps(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    torch.manual_seed(1)  # the classifier's dropout draws the same masks in both runs
    outputs = []
    for x, y in batches:
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        outputs.append(out.detach())
    return outputs


@pytest.mark.parametrize("act_symmetric", [False, True])
def test_prepared_mobilenet_v2_trains_identically(act_symmetric: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).train()
    example = torch.randn(2, 3, 48, 48)  # 48 px: the last feature maps are 2x2, so batch-2 BN stays sane
    prepared = prepare(model, QuantConfig(act_symmetric=act_symmetric, act_bits=8), example).train()
    twin = copy.deepcopy(prepared)
    batches = [(torch.randn(2, 3, 48, 48), torch.randint(0, 10, (2,))) for _ in range(3)]
    counter = _Counter(monkeypatch)
    fused_out = _train_steps(prepared, batches)
    act_quantizers = counter.calls // len(batches)
    assert act_quantizers > 30  # every activation quantizer of MobileNet v2 went through the fused path
    with fused.unfused_path():
        unfused_out = _train_steps(twin, batches)
    assert counter.calls == act_quantizers * len(batches)  # the unfused run did not touch it
    for a, b in zip(fused_out, unfused_out, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    state, twin_state = prepared.state_dict(), twin.state_dict()
    assert state.keys() == twin_state.keys()
    for key, value in state.items():
        assert value.dtype == twin_state[key].dtype and torch.equal(value, twin_state[key]), key
