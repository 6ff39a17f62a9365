"""Logit differences are in output LSBs only when the logits have an output quantizer; otherwise the record
says the unit is real and no field carries an ``_lsb`` name."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import converted_mobilenet_v1

import qat.fidelity as fidelity
from qat.fidelity import compare, evaluate_engines, output_lsb
from qat.intmodel import reference
from qat.intmodel.graph import IntModel, IntNode, TensorQ
from qat.quant.config import QuantConfig
from qat.train.loop import predict


def _two_node_model(out: TensorQ | None, last_op: str = "dequantize") -> IntModel:
    return IntModel(nodes=[IntNode("x", "quantize", [], out), IntNode("output", last_op, ["x"], None)],
                    input_shape=[1, 4])


def test_output_lsb_is_the_scale_of_the_dequantized_tensor_or_none() -> None:
    assert output_lsb(_two_node_model(TensorQ(0.125, 3, 8, False, 0, 255))) == 0.125
    assert output_lsb(_two_node_model(None)) is None  # no output quantizer: no LSB (it was 1.0 before)
    assert output_lsb(_two_node_model(TensorQ(0.125, 3, 8, False, 0, 255), last_op="flatten")) is None


def test_compare_names_its_unit() -> None:
    sim = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    logits = torch.tensor([[0.0, 1.5], [2.0, 1.0]])
    targets = torch.tensor([1, 0])
    in_lsb = compare(sim, sim.argmax(1), logits, targets, 0.25)
    assert in_lsb["logit_diff_unit"] == "lsb"
    assert in_lsb["logit_max_abs_diff_lsb"] == pytest.approx(4.0)  # |Δ| 1.0 = 4 LSBs of 0.25
    assert in_lsb["logit_mean_abs_diff_lsb"] == pytest.approx(1.5 / 4 / 0.25)
    assert in_lsb["logits_within_1lsb"] == pytest.approx(50.0)
    real = compare(sim, sim.argmax(1), logits, targets, None)
    assert real["logit_diff_unit"] == "real"
    assert real["logit_max_abs_diff"] == pytest.approx(1.0) and real["logit_mean_abs_diff"] == pytest.approx(0.375)
    assert not [key for key in real if "lsb" in key]
    assert real["top1"] == in_lsb["top1"] and real["agreement_with_sim"] == in_lsb["agreement_with_sim"]


def _converted():  # type: ignore[no-untyped-def]
    return converted_mobilenet_v1(QuantConfig(act_observer="minmax"), images=16)


def test_block_without_output_quantizer_is_in_real_units(monkeypatch: pytest.MonkeyPatch) -> None:
    int_model, loader, sim_logits, sim_pred, targets = _converted()
    exact = reference.build(int_model, rounding="single")

    def engine(x: torch.Tensor) -> torch.Tensor:  # the reference, off by a known amount in real units
        return exact(x) + 0.5

    logits, _, _ = predict(engine, loader)
    real_max = float((sim_logits - logits).abs().max())
    lsb = output_lsb(int_model)
    assert lsb is not None and real_max > 0

    # the same integer model, but the logits' producer has no output quantizer: the engine is built from the
    # intact model (an engine needs one); the block must not call real units LSBs
    unquantized = copy.deepcopy(int_model)
    unquantized.node(unquantized.nodes[-1].inputs[0]).out = None
    monkeypatch.setattr(fidelity, "build_engine", lambda name, model, threads, device="cpu": (engine, {"engine": name}))
    block, _ = evaluate_engines(unquantized, loader, sim_logits, sim_pred, targets, [], "reference")
    assert block["output_lsb"] is None and block["logit_diff_unit"] == "real"
    assert block["logit_max_abs_diff"] == pytest.approx(real_max)
    assert "logit_max_abs_diff_lsb" not in block and "logit_mean_abs_diff_lsb" not in block
    assert block["engines"]["reference"]["logit_diff_unit"] == "real"
    assert not [key for key in block["engines"]["reference"] if "lsb" in key]

    block, _ = evaluate_engines(int_model, loader, sim_logits, sim_pred, targets, [], "reference")
    assert block["output_lsb"] == lsb and block["logit_diff_unit"] == "lsb"
    assert block["logit_max_abs_diff_lsb"] == pytest.approx(real_max / lsb)
    assert "logit_max_abs_diff" not in block


def test_tie_aware_agreement_counts_a_tie_at_the_top_as_agreement() -> None:
    from qat.fidelity import tie_aware_agreement

    sim = torch.tensor([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])  # row 0: a tie at the top
    integer = torch.tensor([[0.8, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 1.0, 2.0]])  # row 0 one LSB off: picks 1
    assert tie_aware_agreement(sim, integer) == pytest.approx(100 * 2 / 3)  # row 1 is a real disagreement
    fields = compare(sim, sim.argmax(1), integer, torch.tensor([0, 0, 2]), lsb=0.2)
    assert fields["agreement_with_sim"] == pytest.approx(100 / 3)  # strict argmax: row 0 flips too
    assert fields["agreement_with_sim_tie_aware"] == pytest.approx(100 * 2 / 3)
