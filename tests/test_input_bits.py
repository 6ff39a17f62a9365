"""quant.input_bits: the model input's grid apart from the activations' (Esser et al. 2020 §3 keep the first
layer's input at 8 bits under 4-bit activations); read back into the record, narrowed by targets, converted."""

from __future__ import annotations

import pytest
from test_reference import MODELS, calibrated, layer_by_layer_differences

from qat.errors import QatError
from qat.intmodel.convert import convert
from qat.quant.config import QuantConfig
from qat.quant.describe import describe, input_quantizers
from qat.targets import TARGETS, can_saturate, constrain


def test_the_input_gets_its_own_grid_and_the_record_reads_it_back() -> None:
    prepared, _ = calibrated(MODELS["tiny"], QuantConfig(act_bits=4, input_bits=8, act_observer="minmax"), n=8)
    (inputs,) = input_quantizers(prepared)
    assert (inputs.spec.bits, inputs.spec.qmin, inputs.spec.qmax) == (8, 0, 255)
    block = describe(prepared)
    assert (block["input_bits"], block["act_bits"]) == (8, 4)
    default, _ = calibrated(MODELS["tiny"], QuantConfig(act_bits=4), n=8)
    assert (describe(default)["input_bits"], describe(default)["act_bits"]) == (4, 4)
    assert describe(default)["ema_decay"] == 0.99  # EMA runs report their decay (LSQ runs alone did)


def test_the_integer_model_takes_the_input_on_its_grid_and_agrees_with_the_simulation() -> None:
    prepared, x = calibrated(MODELS["tiny"], QuantConfig(act_bits=4, input_bits=8, act_observer="minmax"), n=8)
    int_model = convert(prepared)
    (quantize,) = [n for n in int_model.nodes if n.op == "quantize"]
    assert (quantize.out.bits, quantize.out.qmax) == (8, 255)
    largest, equal = layer_by_layer_differences(prepared, int_model, x)
    assert max(largest.values()) <= 1 and equal >= 0.99, largest


def test_targets_narrow_and_check_the_input_grid() -> None:
    config = QuantConfig(weight_bits=4, act_bits=4, input_bits=8)
    assert can_saturate(QuantConfig(weight_bits=8, act_bits=7, input_bits=8))
    assert not can_saturate(config)
    narrowed, constraints = constrain(QuantConfig(act_bits=7, input_bits=8), TARGETS["x86_avx2"], "acts7")
    assert narrowed.input_bits == 7 and [c.key for c in constraints] == ["quant.input_bits"]
    with pytest.raises(QatError, match=r"^quant.input_bits: 12-bit grids cannot run"):
        constrain(QuantConfig(input_bits=12), TARGETS["x86_vnni"])
    with pytest.raises(QatError, match=r"^quant.input_bits: 1 is outside \[2, 16\]"):
        QuantConfig(input_bits=1)
