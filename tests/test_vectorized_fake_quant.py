"""The CPU fake quantizer as vectorized ops (qat.quant.vectorized) equals torch's fake-quantize kernels bit for bit,
forward and backward, and QAT in every batch-norm mode trains identically on it (issue 19, item 4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import count_calls, requires_cuda
from torch import nn

from qat.quant import fused, vectorized
from qat.quant.config import QuantConfig
from qat.quant.prepare import prepare
from qat.quant.schedule import QuantSchedule

GRIDS = [(0, 255), (-128, 127), (-127, 127), (0, 15), (-8, 7), (1, 255)]


def _hard_values(scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """Random values, exact rounding ties, both clamp edges and beyond, huge values, infinities, signed zeros."""
    g = torch.Generator().manual_seed(qmax - qmin + zero_point)
    codes = torch.arange(qmin - 3, qmax + 4, dtype=torch.float32) - zero_point
    ties = (codes + 0.5) * scale
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, float("inf"), float("-inf")])
    return torch.cat([torch.randn(4000, generator=g) * scale * (qmax - qmin) / 4, ties, codes * scale,
                      (codes - 0.5) * scale, special])


@pytest.mark.parametrize(("qmin", "qmax"), GRIDS)
@pytest.mark.parametrize("scale", [0.0173, 1.0, 3.3e-5])
def test_per_tensor_equals_torch_kernel(qmin: int, qmax: int, scale: float, fake_quant_kernel: str) -> None:
    for zero_point in {qmin, 0 if qmin < 0 else qmin, (qmin + qmax) // 2, qmax}:
        x = _hard_values(scale, zero_point, qmin, qmax).requires_grad_()
        s, z = torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32)
        expected = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
        got = vectorized.fake_quantize(x, s, z, qmin, qmax)
        assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit()), zero_point
        grad = torch.randn_like(x)
        (expected_grad,) = torch.autograd.grad(expected, x, grad)
        (got_grad,) = torch.autograd.grad(got, x, grad)
        assert torch.equal(got_grad, expected_grad) and torch.equal(got_grad.signbit(), expected_grad.signbit())


@pytest.mark.parametrize(("qmin", "qmax"), GRIDS)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize(("device", "without_sync"), [("cpu", False), ("cpu", True),
                                                      pytest.param("cuda", True, marks=requires_cuda)])
def test_per_channel_equals_torch_kernel(qmin: int, qmax: int, axis: int, device: str, without_sync: bool,
                                         fake_quant_kernel: str) -> None:
    """Both per-channel forms (the CPU one, and the one without host syncs used on CUDA and under compile)."""
    g = torch.Generator().manual_seed(axis)
    x = (torch.randn(6, 5, 3, 3, generator=g) * 2).contiguous(memory_format=torch.channels_last)
    # torch's per-channel kernel casts codes to int64 before clamping (undefined beyond 2^63 in C++): huge, finite
    x.permute(0, 2, 3, 1).reshape(-1)[:6] = torch.tensor([0.0, -0.0, 1e12, -1e12, 0.5, -0.5])
    channels = x.shape[axis]
    scale = torch.rand(channels, generator=g) * 0.05 + 1e-3
    zero_point = torch.randint(qmin, qmax + 1, (channels,), generator=g, dtype=torch.int32)
    x, scale, zero_point = x.to(device).requires_grad_(), scale.to(device), zero_point.to(device)
    expected = torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
    if without_sync:
        got = vectorized.fake_quantize_without_sync(x, scale, zero_point, qmin, qmax, axis)
    else:
        got = vectorized.fake_quantize(x, scale, zero_point, qmin, qmax, axis)
    assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())
    grad = torch.randn_like(x)
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_unclipped_weights_skip_clamp_only_when_nothing_can_clip(fake_quant_kernel: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g, requires_grad=True)
    low, high = w.detach().amin((1, 2, 3)), w.detach().amax((1, 2, 3))
    scale = torch.maximum(-low, high) / 127.0
    zero = torch.zeros(8, dtype=torch.int32)
    got = vectorized.fake_quantize_unclipped(w, scale, zero, low, high, -127, 127, 0)
    expected = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)
    assert got is not None and torch.equal(got, expected)
    grad = torch.randn_like(w)
    assert torch.equal(torch.autograd.grad(got, w, grad)[0], torch.autograd.grad(expected, w, grad)[0])
    # a range narrower than the tensor would clip: the unclipped form refuses
    assert vectorized.fake_quantize_unclipped(w, scale / 2, zero, low, high, -127, 127, 0) is None


def _train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], schedule: QuantSchedule) -> None:
    torch.manual_seed(2)  # MobileNet v2's dropout draws the same masks in both runs
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step, (x, y) in enumerate(batches):
        schedule.apply(model, step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("bn_fold", ["jacob", "whitepaper", "unfolded"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_qat_trains_bit_identically_on_the_vectorized_path(bn_fold: str, arch: str, fake_quant_kernel: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).train()
    example = torch.randn(2, 3, 48, 48)
    config = QuantConfig(bn_fold=bn_fold, weight_per_channel=True)
    prepared = prepare(model, config, example).to(memory_format=torch.channels_last).train()
    twin = copy.deepcopy(prepared)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 48, 48, generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]
    schedule = QuantSchedule(act_quant_delay=0, bn_freeze_step=2)  # batch statistics, then frozen
    calls = count_calls(monkeypatch, vectorized, "fake_quantize")
    folds = count_calls(monkeypatch, vectorized, "fold_fake_quantize_weight")
    _train(prepared, batches, schedule)
    assert calls  # the vectorized ops ran
    assert bool(folds) == (fake_quant_kernel == "fused_cpu")  # weights folded, observed, quantized in one call
    with fused.unfused_path():
        _train(twin, batches, schedule)
    state, twin_state = prepared.state_dict(), twin.state_dict()
    assert state.keys() == twin_state.keys()
    for key, value in state.items():
        assert torch.equal(value, twin_state[key]), key


@pytest.mark.parametrize("bn_fold", ["jacob", "whitepaper"])
def test_qat_resumed_from_a_checkpoint_is_exact(bn_fold: str, fake_quant_kernel: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Four QAT steps in one go equal two steps, a checkpoint written and read back (weights_only), and two more,
    across the BN freeze, on each CPU path (issue 19 item 4)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(4, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]
    schedule = QuantSchedule(act_quant_delay=0, bn_freeze_step=2)

    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35).train()
        prepared = prepare(model, QuantConfig(bn_fold=bn_fold), torch.randn(2, 3, 32, 32))
        prepared = prepared.to(memory_format=torch.channels_last).train()
        return prepared, torch.optim.SGD(prepared.parameters(), lr=0.05, momentum=0.9)

    def steps(model: nn.Module, opt: torch.optim.Optimizer, indices: range) -> None:
        for step in indices:
            torch.manual_seed(100 + step)  # dropout masks by step
            schedule.apply(model, step)
            loss = nn.functional.cross_entropy(model(batches[step][0]), batches[step][1])
            opt.zero_grad()
            loss.backward()
            opt.step()

    straight, straight_opt = fresh()
    steps(straight, straight_opt, range(4))
    first, first_opt = fresh()
    steps(first, first_opt, range(2))
    torch.save({"model": first.state_dict(), "optim": first_opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed, resumed_opt = fresh()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optim"])
    steps(resumed, resumed_opt, range(2, 4))
    state, resumed_state = straight.state_dict(), resumed.state_dict()
    assert state.keys() == resumed_state.keys()
    for key, value in state.items():
        assert torch.equal(value, resumed_state[key]), key
