"""Fidelity block of the record: every engine against the simulated model; unsupported engines recorded."""

from __future__ import annotations

import pytest
from conftest import converted_mobilenet_v1

from qat.errors import QatError
from qat.fidelity import check_engine_names, evaluate_engines
from qat.quant.config import QuantConfig


def _setup(config: QuantConfig):  # type: ignore[no-untyped-def]
    return converted_mobilenet_v1(config, images=24)


def test_engines_are_compared_in_output_lsbs() -> None:
    int_model, loader, sim_logits, sim_pred, targets = _setup(QuantConfig(act_observer="minmax"))
    block, logits = evaluate_engines(int_model, loader, sim_logits, sim_pred, targets,
                                     ["reference", "onnxruntime"], "torch_native_x86")
    assert block["primary_engine"] == "torch_native_x86" and logits.shape == (24, 4)
    assert list(block["engines"]) == ["torch_native_x86", "reference", "onnxruntime"]
    for result in block["engines"].values():
        assert result["status"] == "ok" and 0 <= result["agreement_with_sim"] <= 100
        assert result["logit_mean_abs_diff_lsb"] <= result["logit_max_abs_diff_lsb"]
    assert block["min_agreement_with_sim"] == min(r["agreement_with_sim"] for r in block["engines"].values())


def test_an_engine_that_cannot_run_the_model_is_recorded_unsupported() -> None:
    # asymmetric weights: XNNPACK's int8 kernels need weight zero point 0; torch_native runs them
    int_model, loader, sim_logits, sim_pred, targets = _setup(QuantConfig(act_observer="minmax",
                                                                         weight_symmetric=False))
    block, _ = evaluate_engines(int_model, loader, sim_logits, sim_pred, targets, ["executorch_xnnpack"],
                                "torch_native_x86")
    result = block["engines"]["executorch_xnnpack"]
    assert result["status"] == "unsupported" and "needs symmetric weights" in result["reason"]
    assert block["engines"]["torch_native_x86"]["status"] == "ok"


def test_unknown_engine_name_is_a_clear_error() -> None:
    with pytest.raises(QatError, match="latency.eval_engines: unknown engine 'tensorrt'"):
        check_engine_names(["reference", "tensorrt"])
