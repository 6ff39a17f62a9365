"""torch_native: a PyTorch build without qnnpack says that its depthwise kernels saturate; each model runs on its
own quantized backend, whatever was built or selected after it."""

from __future__ import annotations

import logging

import pytest
import torch
from test_torch_native_depthwise import CHANNELS, depthwise_model

from qat.engines import registry
from qat.engines.torch_native import build, engine_info
from qat.intmodel.graph import IntModel, IntNode, TensorQ
from qat.intmodel.reference import ReferenceExecutor


def _without_qnnpack(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.backends.quantized.supported_engines`` without qnnpack (the property reads this C function)."""
    supported = torch._C._supported_qengines()
    qnnpack = torch.backends.quantized._get_qengine_id("qnnpack")
    monkeypatch.setattr(torch._C, "_supported_qengines", lambda: [e for e in supported if e != qnnpack])
    assert "qnnpack" not in torch.backends.quantized.supported_engines


@pytest.mark.parametrize("backend", ["fbgemm", "x86"])
def test_without_qnnpack_the_saturating_depthwise_kernel_is_named(
        backend: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    _without_qnnpack(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="qat"):
        engine = build(depthwise_model(), backend)
    where = "" if backend == "fbgemm" else " where x86 picks fbgemm's kernel"
    expected = f"{backend} (saturating 16-bit sums{where}: qnnpack not in this PyTorch build)"
    assert engine.depthwise_backend == backend and engine.depthwise_kernels == expected
    assert "qnnpack, whose kernel is exact, is not in this PyTorch build" in engine.status_note
    warned = [r for r in caplog.records if r.name == "qat" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "saturating 16-bit" in warned[0].getMessage()
    for info in (engine_info(backend), registry.engine_info(f"torch_native_{backend}")):  # what records hold
        assert info["depthwise_kernels"] == expected and info["status_note"] == engine.status_note
    if backend == "fbgemm":  # and it really is the saturating kernel that runs (x86 picks per host)
        x = torch.full((1, CHANNELS, 5, 5), 255 * 0.02)
        assert (engine(x) - ReferenceExecutor(depthwise_model(), "single")(x)).abs().max() > 10


def test_with_qnnpack_there_is_no_note(caplog: pytest.LogCaptureFixture) -> None:
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this PyTorch build has no qnnpack")
    with caplog.at_level(logging.WARNING, logger="qat"):
        engine = build(depthwise_model(), "x86")
    assert engine.depthwise_kernels == "qnnpack" and engine.status_note is None
    assert "status_note" not in engine_info("x86") and not caplog.records


def pool_model() -> IntModel:
    """quantize -> 2x2 average pool -> dequantize: on this contiguous input x86 rounds ties of the
    mean code to even, qnnpack of the centred mean (Z is odd here: they differ, tests/test_pooling.py)."""
    q = TensorQ(scale=0.0157, zero_point=3, bits=8, signed=False, qmin=0, qmax=255)
    pool = IntNode("pool", "avg_pool", ["input"], q,
                   {"adaptive": False, "kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0]})
    nodes = [IntNode("input", "quantize", [], q), pool, IntNode("output", "dequantize", ["pool"], None)]
    return IntModel(nodes=nodes, input_shape=[1, 8, 6, 6])


@pytest.mark.parametrize("first_backend", ["x86", "fbgemm"])
def test_each_model_runs_on_its_own_backend(first_backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this PyTorch build has no qnnpack")
    monkeypatch.setattr(torch.backends.quantized, "engine", torch.backends.quantized.engine)  # restored after
    torch.manual_seed(0)
    x = torch.rand(1, 8, 6, 6) * 4
    first = build(pool_model(), first_backend)
    before = first(x)
    second = build(pool_model(), "qnnpack")
    assert not torch.equal(second(x), before)  # the two backends' arithmetic differs on this input
    assert torch.equal(first(x), before)
    torch.backends.quantized.engine = "qnnpack"  # whatever else selected since
    assert torch.equal(first(x), before)
    assert torch.backends.quantized.engine == "qnnpack"  # forward restores the engine it found

    seen: list[str] = []  # and during forward, the engine is the model's own
    name, inputs, fn = first.steps[1]
    first.steps[1] = (name, inputs, lambda v: (seen.append(torch.backends.quantized.engine), fn(v))[1])
    first(x)
    assert seen == [first_backend]

