"""PtqConfig: bad values are one-line QatErrors naming the key; the dataclass works as a Hydra schema."""

from __future__ import annotations

import pytest
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from torch import nn

from qat.errors import QatError
from qat.ptq.apply import methods_tag, run_ptq
from qat.ptq.config import PtqConfig
from qat.quant.config import QuantConfig
from qat.quant.prepare import prepare


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"calibration_observer": "kl"}, "ptq.calibration_observer: unknown value 'kl'"),
    ({"calibration_batches": 0}, "ptq.calibration_batches: 0 is not a positive integer"),
    ({"adaquant_iterations": -5}, "ptq.adaquant_iterations: -5 is not a positive integer"),
    ({"adaquant_batch": 2.5}, "ptq.adaquant_batch: 2.5 is not a positive integer"),
    ({"adaquant_lr_weight": -1e-3}, "ptq.adaquant_lr_weight: -0.001 is negative"),
    ({"percentile": 40.0}, "ptq.percentile: 40.0 is outside"),
    ({"two_tensor_threshold": 0.0}, "ptq.two_tensor_threshold: 0.0 is not positive"),
    ({"bit_allocation_budget": 1.5}, "ptq.bit_allocation_budget: 1.5 is outside"),
    ({"bit_allocation_metric": "latency"}, "ptq.bit_allocation_metric: unknown value 'latency'"),
    ({"bit_choices": []}, "ptq.bit_choices: .* is empty"),
    ({"bit_choices": [4, 4]}, "ptq.bit_choices: .* repeats"),
    ({"bit_choices": [1, 8]}, r"ptq.bit_choices: 1 is outside \[2, 16\]"),
])
def test_bad_values_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(QatError, match=message):
        PtqConfig(**kwargs)


def test_registers_as_a_structured_config_and_types_are_checked() -> None:
    ConfigStore.instance().store(group="ptq", name="ptq_schema_test", node=PtqConfig)
    cfg = OmegaConf.structured(PtqConfig)
    cfg.merge_with(OmegaConf.create({"adaquant": True, "bit_allocation_budget": 0.75, "bit_choices": [2, 4, 8]}))
    built = OmegaConf.to_object(cfg)
    assert isinstance(built, PtqConfig) and built.bit_choices == [2, 4, 8] and built.adaquant
    with pytest.raises(Exception, match="adaquant_iterations"):
        cfg.merge_with(OmegaConf.create({"adaquant_iterations": "many"}))
    with pytest.raises(Exception, match="adaquant_itrations"):
        cfg.merge_with(OmegaConf.create({"adaquant_itrations": 3}))


def test_method_tag_names_the_combination() -> None:
    assert methods_tag(PtqConfig()) == "minmax"
    assert methods_tag(PtqConfig(calibration_observer="mse", two_tensor_threshold=0.01)) == "mse+two_tensor"
    tag = methods_tag(PtqConfig(adaquant=True, bn_reestimation=True, bias_correction=True,
                                bit_allocation_budget=0.75))
    assert tag == "bitssize0.75+minmax+adaquant+bn+bias"


def _prepared() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    return prepare(net, QuantConfig(), torch.zeros(1, 3, 8, 8))


def test_run_ptq_rejects_bad_input() -> None:
    with pytest.raises(QatError, match="ptq: expected a PtqConfig, got dict"):
        run_ptq(_prepared(), [(torch.zeros(2, 3, 8, 8), None)], {"adaquant": True})  # type: ignore[arg-type]
    with pytest.raises(QatError, match="ptq.calibration_batches: the calibration loader yielded no images"):
        run_ptq(_prepared(), [], PtqConfig())
    floating = prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), QuantConfig(overrides=[{"pattern": "0", "keep_float": True}]),
                       torch.zeros(1, 3, 8, 8))
    with pytest.raises(QatError, match="ptq: the model has no quantized conv or linear layer"):
        run_ptq(floating, [(torch.zeros(2, 3, 8, 8), None)], PtqConfig())
    with pytest.raises(QatError, match="ptq.two_tensor_threshold: layer 0 has per-tensor weights"):
        per_tensor = prepare(nn.Sequential(nn.Conv2d(3, 4, 3)), QuantConfig(weight_per_channel=False),
                             torch.zeros(1, 3, 8, 8))
        run_ptq(per_tensor, [(torch.randn(2, 3, 8, 8), None)], PtqConfig(two_tensor_threshold=1e-9))
