"""Issue 22 items 2-4: every engine is fed by one pass over the validation data (each batch decoded once), with
progress and the time left; an engine that fails during the pass is recorded unsupported; the reference's device
is a setting (``latency.eval_device``) and on CUDA it gives the CPU's integer results bit for bit."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from conftest import converted_mobilenet_v1, requires_cuda

import qat.fidelity as fidelity
from qat.errors import QatError
from qat.fidelity import eval_device, evaluate_engines
from qat.intmodel import reference
from qat.quant.config import QuantConfig
from qat.train.loop import predict


class CountingLoader:
    """The batches of ``loader``, counting how many were decoded (iterated)."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.batches = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for batch in self.loader:
            self.batches += 1
            yield batch


@pytest.fixture(scope="module")
def converted():  # type: ignore[no-untyped-def]
    return converted_mobilenet_v1(QuantConfig(act_observer="minmax"), images=24)


def test_engines_share_one_pass_and_report_progress(converted, caplog: pytest.LogCaptureFixture) -> None:
    int_model, loader, sim_logits, sim_pred, targets = converted
    counting = CountingLoader(loader)
    with caplog.at_level(logging.INFO, logger="qat"):
        block, logits = evaluate_engines(int_model, counting, sim_logits, sim_pred, targets,
                                         ["reference", "onnxruntime"], "torch_native_x86")
    assert counting.batches == len(loader) > 1  # three engines, one pass
    assert [e["status"] for e in block["engines"].values()] == ["ok"] * 3
    assert all(e["device"] == "cpu" and e["eval_s"] > 0 and e["build_s"] > 0 for e in block["engines"].values())
    # the shared pass gives each engine the logits its own pass gives
    assert torch.equal(logits, predict(fidelity.build_engine("torch_native_x86", int_model, 1)[0], loader)[0])
    alone, _, _ = predict(reference.build(int_model, rounding="single"), loader)
    _, shared = evaluate_engines(int_model, loader, sim_logits, sim_pred, targets, ["onnxruntime"], "reference")
    assert torch.equal(shared, alone)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[fidelity] ")]
    final = [line for line in lines if f"{len(loader)}/{len(loader)} batches (24 images)" in line]
    assert final and "images/s" in final[0] and "left" in final[0] and "reference" in final[0]


@pytest.mark.parametrize("failing_batch", [1, 2])  # on the first, no batch of its logits exists (a crash before)
def test_an_engine_failing_during_the_pass_is_unsupported_and_the_others_finish(
        converted, monkeypatch: pytest.MonkeyPatch, failing_batch: int) -> None:
    int_model, loader, sim_logits, sim_pred, targets = converted
    built = fidelity.build_engine

    def build(name: str, model: Any, threads: int, device: Any = "cpu") -> Any:
        engine, info = built(name, model, threads, device)
        if name != "onnxruntime":
            return engine, info
        calls = []

        def failing(x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if len(calls) == failing_batch:
                raise QatError("engine", "stopped on a batch", "none")
            return engine(x)

        return failing, info

    monkeypatch.setattr(fidelity, "build_engine", build)
    block, _ = evaluate_engines(int_model, CountingLoader(loader), sim_logits, sim_pred, targets,
                                ["onnxruntime", "reference"], "torch_native_x86")
    assert block["engines"]["onnxruntime"] == {"status": "unsupported",
                                               "reason": "engine: stopped on a batch (none)"}
    assert block["engines"]["reference"]["status"] == "ok"
    assert list(block["engines"]) == ["torch_native_x86", "onnxruntime", "reference"]


def test_eval_device_names_its_key() -> None:
    assert eval_device("auto", torch.device("cpu")) == torch.device("cpu")
    assert eval_device("cpu", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(QatError, match="latency.eval_device: .*valid choices: auto, cpu, cuda"):
        eval_device("tpu", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(QatError, match="latency.eval_device: cuda, but no CUDA device is visible"):
            eval_device("cuda", torch.device("cpu"))


def test_pair16_reference_stays_on_the_cpu(converted) -> None:
    int_model = converted[0]
    _, info = fidelity.build_engine("reference_pair16", int_model, 1, "cuda")  # built without touching a GPU
    assert info["device"] == "cpu"
    with pytest.raises(QatError, match="latency.eval_device: the pair16 reference runs on the CPU only"):
        reference.build(int_model, accumulation="pair16", device="cuda")


@requires_cuda
def test_reference_on_cuda_equals_the_cpu_bit_for_bit(converted) -> None:
    int_model, loader, sim_logits, sim_pred, targets = converted
    cpu, _ = fidelity.build_engine("reference", int_model, 1, "cpu")
    gpu, info = fidelity.build_engine("reference", int_model, 1, "cuda")
    assert info["device"].startswith("cuda")
    for images, _ in loader:
        assert torch.equal(cpu(images), gpu(images))
    executor = reference.build(int_model, rounding="single", device="cuda")
    images = next(iter(loader))[0]
    on_cpu = reference.build(int_model, rounding="single").run_layers(images)
    for name, codes in executor.run_layers(images.cuda()).items():
        assert torch.equal(codes.cpu(), on_cpu[name]), name
    block, _ = evaluate_engines(int_model, loader, sim_logits, sim_pred, targets, ["reference"], "torch_native_x86",
                                device=torch.device("cuda"))
    assert block["engines"]["reference"]["device"].startswith("cuda")
    assert block["engines"]["torch_native_x86"]["device"] == "cpu"
