"""qat's fused CPU fake-quantize kernel (qat.quant.cpu_kernel, issue 19): the switch, what it reports, and the
memory layouts the kernel must handle exactly as torch's kernels do."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from conftest import built_cpu_kernel, count_calls

from qat.errors import QatError
from qat.quant import cpu_kernel, fused, vectorized, whitepaper_bn
from qat.quant.fake_quant import FakeQuantize, fold_and_quantize
from qat.quant.modules import QConvBnAct, QLinear, _DivideByChannel
from qat.quant.observers import CurrentMinMaxObserver, EmaMinMaxObserver
from qat.quant.scheme import QuantSpec


def test_unknown_choice_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "fast")
    with pytest.raises(QatError, match=f"{cpu_kernel.ENV_VAR}: unknown value 'fast'.*aten, auto, fused"):
        cpu_kernel.choice()


def test_describe_names_the_path(fake_quant_kernel: str) -> None:
    described = cpu_kernel.describe()
    assert described["fake_quant_kernel"] == fake_quant_kernel
    if fake_quant_kernel == "aten":
        assert "aten_path" in described["fake_quant_kernel_reason"]


def _layouts() -> list[tuple[str, torch.Tensor, int | None]]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, 5, 3, generator=g) * 3
    return [
        ("channels_last axis 1", base.contiguous(memory_format=torch.channels_last), 1),
        ("channels_last axis 0", base.contiguous(memory_format=torch.channels_last), 0),
        ("transposed (dense, permuted) axis 2", base.transpose(1, 2), 2),
        ("sliced (not dense) axis 1", base[:, :, ::2], 1),
        ("size-1 channel with an odd stride", base[:, :1].as_strided((4, 1, 5, 3), (90, 7, 3, 1)), 1),
        ("per tensor, sliced", base[1:, 2:], None),
        ("0-d", torch.tensor(0.37), None),
        ("empty", torch.empty(0, 6), 1),
    ]


@pytest.mark.parametrize("case", range(len(_layouts())), ids=[name for name, _, _ in _layouts()])
def test_layouts_equal_torch_kernels(case: int, fake_quant_kernel: str) -> None:
    _, x, axis = _layouts()[case]
    x = x.detach().requires_grad_()
    qmin, qmax = 0, 255
    if axis is None:
        scale, zero_point = torch.tensor(0.05), torch.tensor(131, dtype=torch.int32)
        expected = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    else:
        channels = x.shape[axis]
        scale = torch.linspace(0.01, 0.04, channels)
        zero_point = torch.arange(channels, dtype=torch.int32) * 7 + 100
        expected = torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
    got = vectorized.fake_quantize(x, scale, zero_point, qmin, qmax, axis)
    assert got.shape == expected.shape and torch.equal(got, expected)
    if x.numel():
        assert int((got != x).sum()) > 0  # some values moved to the grid, some clipped
    grad = torch.randn(x.shape).transpose(0, -1).contiguous().transpose(0, -1)  # strides unlike the mask's
    assert torch.equal(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])


def test_a_failed_build_under_auto_falls_back_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("Error building extension 'qat_cpu_kernels'\nc++: not found")

    monkeypatch.setattr(cpu_kernel, "_build", broken)
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "auto")
    assert cpu_kernel.ops() is None
    assert cpu_kernel.describe() == {"fake_quant_kernel": "aten", "fake_quant_kernel_reason":
                                     "RuntimeError: c++: not found"}
    assert "could not be built (RuntimeError: c++: not found)" in caplog.text
    monkeypatch.setattr(cpu_kernel, "_loaded", {})
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "fused")
    with pytest.raises(QatError, match=f"{cpu_kernel.ENV_VAR}: the fused CPU kernel could not be built"):
        cpu_kernel.ops()


WEIGHT_SPECS = [QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True, per_channel=True),
                QuantSpec(bits=8, per_channel=True), QuantSpec(bits=4, signed=True, symmetric=True, per_channel=True)]


def _weights() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    conv = torch.randn(6, 4, 3, 3, generator=g)
    conv[1] = 0.0  # a dead channel: S = eps
    conv[2] = conv[2].abs()  # one-signed channels: the range widens to contain 0
    conv[3] = -conv[3].abs()
    return [("conv", conv), ("conv channels_last", conv.contiguous(memory_format=torch.channels_last)),
            ("linear", torch.randn(5, 7, generator=g))]


@pytest.mark.parametrize("spec", WEIGHT_SPECS, ids=["int8_sym_narrow", "uint8_asym", "int4_sym"])
@pytest.mark.parametrize("case", range(3), ids=[name for name, _ in _weights()])
@pytest.mark.parametrize("folded", [True, False], ids=["folded", "no_fold"])
def test_fold_observe_quantize_equals_the_ops_it_replaces(spec: QuantSpec, case: int, folded: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One kernel call for w · factor, its per-channel range, (S, Z) and the fake quantizer gives the generic
    path's output, buffers and gradients (to the weight and to the fold factor) bit for bit."""
    built_cpu_kernel()
    _, w = _weights()[case]
    factor = torch.linspace(0.5, 2.5, w.shape[0]) if folded else None
    fast_fq = FakeQuantize(spec, CurrentMinMaxObserver(per_channel=True), observe_in_eval=True).train()
    slow_fq = copy.deepcopy(fast_fq)
    calls = count_calls(monkeypatch, vectorized, "fold_fake_quantize_weight")
    results = []
    for fq, path in ((fast_fq, nullcontext()), (slow_fq, fused.unfused_path())):
        weight = w.clone().requires_grad_()
        f = factor.clone().requires_grad_() if factor is not None else None
        with path:
            out = fold_and_quantize(fq, weight, f)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
        grads = torch.autograd.grad(out, [weight] + ([f] if f is not None else []), grad)
        results.append((out, grads, fq.scale, fq.zero_point, fq.observer.min_val, fq.observer.max_val))
    assert len(calls) == 1  # the fast path ran once, the generic one not at all
    (out, grads, *state), (ref_out, ref_grads, *ref_state) = results
    assert torch.equal(out, ref_out) and torch.equal(out.signbit(), ref_out.signbit())
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(state, ref_state, strict=True))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 units in the last place (same-signed values)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
def test_batch_moments_agree_with_var_mean(layout: torch.memory_format) -> None:
    """Jacob eq. 14's batch moments: within one ulp of torch.var_mean and equal on almost every channel (both
    accumulate in float64), also for a large mean (two passes: no cancellation); gradients equal autograd's
    var_mean backward bit for bit."""
    built_cpu_kernel()
    g = torch.Generator().manual_seed(11)
    equal = total = 0
    for shape, offset in [((8, 64, 9, 9), 0.0), ((4, 96, 5, 7), 300.0), ((16, 960, 2, 2), -2.0), ((3, 5, 1, 1), 0.5)]:
        y = (torch.randn(shape, generator=g) * 2 + offset).contiguous(memory_format=layout).requires_grad_()
        var, mean = vectorized.batch_moments(y)
        ref_var, ref_mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
        assert int(_ulps(var, ref_var).max()) <= 1 and int(_ulps(mean, ref_mean).max()) <= 1
        equal += int((var == ref_var).sum() + (mean == ref_mean).sum())
        total += 2 * shape[1]
        grad_var, grad_mean = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
        got = torch.autograd.grad((var, mean), y, (grad_var, grad_mean), retain_graph=True)[0]
        expected = torch.autograd.grad((ref_var, ref_mean), y, (grad_var, grad_mean), retain_graph=True)[0]
        assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())
        for ours, theirs, grad in ((var, ref_var, grad_var), (mean, ref_mean, grad_mean)):  # one moment used
            got = torch.autograd.grad(ours, y, grad, retain_graph=True)[0]
            expected = torch.autograd.grad(theirs, y, grad, retain_graph=True)[0]
            assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())
    assert equal >= 0.99 * total, (equal, total)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("grad_layout", ["same", "other"])
@pytest.mark.parametrize("conv_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("offset", [1.5, 300.0], ids=["mean_1.5", "mean_300"])  # one-pass moments: no cancellation
def test_whitepaper_batch_norm_closed_form(layout: torch.memory_format, grad_layout: str, conv_bias: bool,
                                           offset: float) -> None:
    """Whitepaper Fig. 13's correction and batch norm in the kernel's closed form (qat.quant.whitepaper_bn): the
    output, the statistics for the running averages and every gradient at least as close to the float64 truth as
    the division followed by F.batch_norm (the path without the kernel), or within 2 float32 ulps of the largest
    value, and s's gradient, which the division's path takes as a difference of large terms, far closer."""
    ops = built_cpu_kernel()
    g = torch.Generator().manual_seed(13)
    channels, eps = 24, 1e-5
    y = (torch.randn(8, channels, 7, 9, generator=g) * 3 + offset).contiguous(memory_format=layout)
    s = (torch.rand(channels, generator=g) * 2 + 0.1) * torch.where(torch.arange(channels) % 3 == 0, -1.0, 1.0)
    gamma, beta = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    bias = torch.randn(channels, generator=g) if conv_bias else None
    other = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format
    grad = torch.randn(y.shape, generator=g).contiguous(memory_format=layout if grad_layout == "same" else other)

    def run(dtype: torch.dtype, path: str) -> list[torch.Tensor]:
        leaves = [t.to(dtype).requires_grad_() for t in (y, s, gamma, beta)]
        b = bias.to(dtype).requires_grad_() if bias is not None else None
        yy, ss, gg, bb = leaves
        # running statistics with momentum 1: the batch's own (the variance made unbiased)
        mean, var = torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)
        if path == "division":
            x = _DivideByChannel.apply(yy, ss.reshape(1, -1, 1, 1))
            x = x + b.reshape(1, -1, 1, 1) if b is not None else x
            out = torch.nn.functional.batch_norm(x, mean, var, gg, bb, True, 1.0, eps)
        else:
            out = whitepaper_bn.whitepaper_batch_norm(yy, ss, gg, bb, b, mean, var, 1.0, eps, ops)
        grads = torch.autograd.grad(out, leaves + ([b] if b is not None else []), grad.to(dtype))
        return [out, mean, var, *grads]

    truth, division = run(torch.float64, "division"), run(torch.float32, "division")
    kernel = run(torch.float32, "kernel")
    assert kernel[0].is_contiguous(memory_format=layout) and kernel[3].is_contiguous(memory_format=layout)
    names = ["out", "mean", "var", "grad_y", "grad_s", "grad_gamma", "grad_beta", "grad_bias"]
    for name, t, o, a in zip(names, truth, kernel, division, strict=False):  # no grad_bias without a bias
        err, division_err = (o.double() - t).abs().max(), (a.double() - t).abs().max()
        if name == "grad_s":
            assert err <= 1e-4 * t.abs().max() and err < division_err, (err, division_err)
        elif name == "grad_bias":  # batch norm removes the conv bias: 0 exactly (the division's path: noise)
            assert torch.equal(o, torch.zeros_like(o)) and t.abs().max() <= 1e-9 * truth[6].abs().max()
        else:
            assert err <= max(division_err, 2 * torch.finfo(torch.float32).eps * t.abs().max()), (name, err)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
def test_whitepaper_layer_trains_alike_on_both_paths(layout: torch.memory_format,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A whitepaper-folded QConvBnAct with batch statistics on the kernel's closed form and on the ATen ops (the
    division and F.batch_norm): the output, the running statistics (one update each, num_batches_tracked counted
    once) and every parameter's gradient agree within float32 rounding; the closed form's conv-bias gradient is 0."""
    built_cpu_kernel()
    torch.manual_seed(5)
    conv, bn = torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
    torch.nn.init.uniform_(bn.weight, -1.5, 1.5)
    weight_fq = FakeQuantize(WEIGHT_SPECS[0], CurrentMinMaxObserver(per_channel=True))
    layer = QConvBnAct(conv, bn, "relu6", weight_fq, "whitepaper").train()
    x = torch.randn(6, 8, 10, 10).contiguous(memory_format=layout)
    calls = count_calls(monkeypatch, whitepaper_bn, "whitepaper_batch_norm")
    results = {}
    for path in ("kernel", "division"):
        with cpu_kernel.aten_path() if path != "kernel" else nullcontext():
            twin = copy.deepcopy(layer)
            out = twin(x)
            names, params = zip(*twin.named_parameters(), strict=True)
            grads = dict(zip(names, torch.autograd.grad(out.square().sum(), params), strict=True))
            results[path] = {"out": out.detach(), "running_mean": twin.bn.running_mean,
                             "running_var": twin.bn.running_var, **grads}
            assert int(twin.bn.num_batches_tracked) == 1
    assert len(calls) == 1  # the closed form ran on the kernel's path only
    division = results["division"]
    # batch norm removes the conv bias exactly: its gradient is 0 (the division's path leaves rounding noise)
    assert float(division.pop("conv.bias").abs().max()) <= 1e-5 * float(division["bn.bias"].abs().max())
    assert torch.equal(results["kernel"].pop("conv.bias"), torch.zeros(16))
    for name, value in results["kernel"].items():
        assert float((value.double() - division[name].double()).abs().max()) <= 1e-5 * float(
            division[name].abs().max()), name


@pytest.mark.parametrize("per_channel", [True, False])
def test_integer_bias_equals_aten(per_channel: bool) -> None:
    """The simulated int32 bias (Jacob §2.4) by the kernel equals the float64 ATen ops: ties, clamped values."""
    built_cpu_kernel()
    channels = 9
    spec = QuantSpec(bits=8, signed=True, symmetric=True, narrow_range=True, per_channel=per_channel)
    weight_fq = FakeQuantize(spec, CurrentMinMaxObserver(per_channel=per_channel))
    weight_fq(torch.linspace(-1, 1, channels * 4).reshape(channels, 4))  # initialises range and scale
    input_fq = FakeQuantize(QuantSpec(), EmaMinMaxObserver())
    input_fq(torch.linspace(-0.3, 5.0, 50))
    layer = QLinear(torch.nn.Linear(4, channels), weight_fq)
    layer.bind_input_quantizer(input_fq)
    step = (input_fq.scale.double() * weight_fq.scale.double()).float()
    step = step.expand(channels) if step.numel() == 1 else step
    bias = torch.tensor([0.0, -0.0, 2.5, -3.5, 1e30, -1e30, 0.1, 7.0, -2.2]) * step  # ties, beyond int32
    results = []
    for context in (nullcontext(), cpu_kernel.aten_path()):
        with context:
            b = bias.clone().requires_grad_()
            out = layer.quantized_bias(b, weight_fq)
            results.append((out, torch.autograd.grad(out, b, torch.arange(channels, dtype=torch.float32))[0]))
    (out, grad), (ref_out, ref_grad) = results
    assert torch.equal(out, ref_out) and torch.equal(out.signbit(), ref_out.signbit()) and torch.equal(grad, ref_grad)
    assert not torch.equal(out, bias)  # something was rounded


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_activation_handoff_gradients(activation: str) -> None:
    """A ReLU/ReLU6 output handed to its activation quantizer: that quantizer's kernel applies the activation's
    gradient mask with its own (boundaries 0 and 6, NaN, clipped codes, a gradient in another layout), bit for bit
    the two separate backward passes; a handed-off output that never reaches the quantizer (a layer run alone, as
    AdaQuant does) still gets the activation's own gradient."""
    built_cpu_kernel()
    g = torch.Generator().manual_seed(17)
    y0 = (torch.randn(4, 8, 5, 5, generator=g) * 4).contiguous(memory_format=torch.channels_last)
    y0[0, 0, 0, :5] = torch.tensor([0.0, -0.0, 6.0, float("nan"), 1e9])
    reference = getattr(torch.nn.functional, activation)
    fq = FakeQuantize(QuantSpec(), EmaMinMaxObserver()).train()
    fq(torch.linspace(-1.0, 3.0, 16))  # a running range narrower than the batch: codes clip at both ends
    twin = copy.deepcopy(fq)
    for grad in (torch.randn(y0.shape, generator=g), torch.randn(y0.shape, generator=g).contiguous()):
        y, y_ref = y0.clone().requires_grad_(), y0.clone().requires_grad_()
        handed = vectorized.hand_off_activation(y.clone(), activation)  # a layer's output, changed in place
        assert handed is not None
        out, expected = fq(handed), twin(reference(y_ref))
        assert torch.equal(out, expected) or torch.equal(out.nan_to_num(), expected.nan_to_num())
        got, want = torch.autograd.grad(out, y, grad)[0], torch.autograd.grad(expected, y_ref, grad)[0]
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.signbit(), want.signbit()) and got.stride() == want.stride()
    alone, alone_ref = y0.clone().requires_grad_(), y0.clone().requires_grad_()
    grad = torch.randn(y0.shape, generator=g)
    got = torch.autograd.grad(vectorized.hand_off_activation(alone, activation), alone, grad)[0]
    want = torch.autograd.grad(reference(alone_ref), alone_ref, grad)[0]
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_only_layers_feeding_one_quantizer_hand_off_their_activation() -> None:
    import torchvision

    from qat.quant.config import QuantConfig
    from qat.quant.modules import QConvBnAct
    from qat.quant.prepare import prepare

    model = prepare(torchvision.models.mobilenet_v2(num_classes=10), QuantConfig(), torch.randn(1, 3, 32, 32))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QConvBnAct)}
    assert all(m.activation_handoff == (m.activation == "relu6") for m in layers.values())
    assert sum(m.activation_handoff for m in layers.values()) == 35


@pytest.mark.parametrize(("conv_bias", "affine"), [(False, True), (True, True), (True, False)])
def test_running_fold_equals_aten(conv_bias: bool, affine: bool) -> None:
    """The running-statistics fold (frozen BN, Jacob eq. 14) by the kernel: factor, folded bias and the gradients to
    gamma, beta and the conv bias equal the ATen ops' bit for bit."""
    built_cpu_kernel()
    torch.manual_seed(19)
    conv, bn = torch.nn.Conv2d(3, 12, 3, bias=conv_bias), torch.nn.BatchNorm2d(12, affine=affine)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.0, 3.0)
    bn.running_var[0] = 0.0  # eps alone under the root
    if affine:
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
    layer = QConvBnAct(conv, bn, "relu", FakeQuantize(QuantSpec(per_channel=True), CurrentMinMaxObserver(True)))
    params = [p for p in (bn.weight, bn.bias, conv.bias) if p is not None]
    g = torch.Generator().manual_seed(3)
    grads = (torch.randn(12, generator=g), torch.randn(12, generator=g))
    results = []
    for context in (nullcontext(), cpu_kernel.aten_path()):
        with context:
            factor, folded = layer.fold_factor_and_bias()
            used = [(out, grad) for out, grad in zip((factor, folded), grads, strict=True) if out.requires_grad]
            outs, out_grads = zip(*used, strict=True) if used else ((), ())
            got = torch.autograd.grad(outs, params, out_grads, allow_unused=True) if used else ()
            results.append((factor.detach(), folded.detach(), *got, torch.tensor(len(used))))
    for ours, theirs in zip(*results, strict=True):
        assert (ours is None and theirs is None) or (torch.equal(ours, theirs)
                                                      and torch.equal(ours.signbit(), theirs.signbit()))


@pytest.mark.parametrize("conv_bias", [False, True])
def test_jacob_batch_fold_equals_aten(conv_bias: bool) -> None:
    """Jacob eq. 14 with batch statistics: the fold factor, folded bias, running-statistics update and every
    gradient (to the conv input and weights through the moments, gamma, beta, conv bias) equal the ATen ops'
    given the same moments (the moments themselves: test_batch_moments_agree_with_var_mean)."""
    built_cpu_kernel()
    results = []
    for context in (nullcontext(), cpu_kernel.aten_path()):
        torch.manual_seed(23)
        conv, bn = torch.nn.Conv2d(4, 6, 3, bias=conv_bias), torch.nn.BatchNorm2d(6)
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
        layer = QConvBnAct(conv, bn, "none", FakeQuantize(QuantSpec(bits=8, signed=True, symmetric=True,
                                                                    per_channel=True),
                                                          CurrentMinMaxObserver(per_channel=True), True),
                           bn_fold="jacob").train()
        x = torch.randn(8, 4, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
        with context, pytest.MonkeyPatch.context() as patch:
            # the same moments on both paths, so the comparison is of everything after them
            patch.setattr(vectorized, "batch_moments", lambda y: torch.var_mean(y, dim=(0, 2, 3), unbiased=False))
            out = layer(x)
            params = [x, conv.weight, bn.weight, bn.bias] + ([conv.bias] if conv_bias else [])
            grads = torch.autograd.grad(out, params, torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
        results.append((out.detach(), bn.running_mean.clone(), bn.running_var.clone(), *grads))
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs) and torch.equal(ours.signbit(), theirs.signbit())
