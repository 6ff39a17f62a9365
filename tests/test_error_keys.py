"""Errors of the quantization recipe and of detection training name keys that exist in the config (issue 16
item 7); the apps' error lines are checked against their composed configs in tests/test_bad_input_table.py."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import nn

from qat.detection.config import DetectTrainConfig
from qat.detection.train import detection_loss
from qat.errors import BAD_INPUT, ArgumentParser, QatError, one_line_errors
from qat.quant.config import QuantConfig
from qat.quant.observers import EmaMinMaxObserver
from qat.quant.scheme import QuantSpec, quantize
from qat.train import engine
from qat.train.loop import OptimConfig

QUANT_KEYS = {f"quant.{f.name}" for f in fields(QuantConfig)}


def _key(exc: pytest.ExceptionInfo[QatError]) -> str:
    return exc.value.key


@pytest.mark.parametrize(("options", "key"), [
    ({"weight_bits": 1}, "quant.weight_bits"),
    ({"act_bits": 17}, "quant.act_bits"),
    ({"ema_decay": 1.0}, "quant.ema_decay"),
    ({"ema_decay": -0.1}, "quant.ema_decay"),
])
def test_recipe_errors_name_the_recipe_key(options: dict[str, float], key: str) -> None:
    with pytest.raises(QatError) as exc:
        QuantConfig(**options)
    assert _key(exc) == key and key in QUANT_KEYS


def test_weight_axis_error_names_the_recipe_keys() -> None:
    spec = QuantConfig(weight_ch_axis=3).weight_spec()
    with pytest.raises(QatError) as exc:
        quantize(torch.zeros(4, 4), torch.ones(4), torch.zeros(4, dtype=torch.int32), spec)
    assert _key(exc) == "quant.weight_ch_axis"
    assert "quant.weight_per_channel=false" in exc.value.fix and "quant.weight_per_channel" in QUANT_KEYS


def test_spec_key_is_a_template_or_a_dotted_prefix() -> None:
    assert QuantConfig().act_spec().key_of("symmetric") == "quant.act_symmetric"
    assert QuantSpec(key="ptq").key_of("bits") == "ptq.bits"
    with pytest.raises(QatError) as exc:
        QuantSpec(signed=False, symmetric=True, key="quant.act_{}")
    assert _key(exc) == "quant.act_symmetric" and "quant.act_symmetric=false" in exc.value.fix


def test_ema_observer_names_its_decay_key() -> None:
    with pytest.raises(QatError) as exc:
        EmaMinMaxObserver(decay=1.5)
    assert _key(exc) == "quant.ema_decay"
    with pytest.raises(QatError) as exc:
        EmaMinMaxObserver(decay=1.5, key="ptq.ema_decay")
    assert _key(exc) == "ptq.ema_decay"


class _DivergingDetector(nn.Module):
    """Stands in for the SSDLite detector: its loss is infinite."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"bbox_regression": self.w * float("inf"), "classification": self.w, "num_foreground": 0}


@pytest.mark.parametrize(("phase", "lr_key"), [("float", "optim.lr"), ("qat", "train.qat_lr")])
def test_detection_divergence_names_the_phase_lr_key(phase: str, lr_key: str, tmp_path: Path) -> None:
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    loader = [([torch.zeros(3, 8, 8)], [target])]
    with pytest.raises(QatError) as exc:
        engine.fit(_DivergingDetector(), loader, engine.Task(loss=detection_loss), train=DetectTrainConfig(),
                   optim=OptimConfig(), seed=0, phase=phase, epochs=1, lr=0.1, checkpoint=tmp_path / f"{phase}_last.pt")
    assert _key(exc) == lr_key and f"lower {lr_key}" in exc.value.fix
    assert "no checkpoint had been written yet" in exc.value.fix


def _bad(key: str) -> int:
    raise QatError(key, "is wrong", "fix it")


@pytest.mark.parametrize("exits", [True, False])
def test_one_line_errors_is_one_line_and_status_2(exits: bool, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The one error wrapper of every app: Hydra apps exit, argparse apps' ``main(argv) -> int`` return 2."""
    monkeypatch.delenv("QAT_DEBUG", raising=False)
    wrapped = one_line_errors(_bad) if exits else one_line_errors(exit=False)(_bad)
    assert wrapped.__name__ == "_bad"
    if exits:
        with pytest.raises(SystemExit) as exit_info:
            wrapped("data.root")
        assert exit_info.value.code == BAD_INPUT == 2
    else:
        assert wrapped("data.root") == BAD_INPUT
    out, err = capsys.readouterr()
    assert out == "" and err == "error: data.root: is wrong (fix it)\n"
    monkeypatch.setenv("QAT_DEBUG", "1")
    with pytest.raises(QatError, match="^data.root: is wrong"):
        wrapped("data.root")
    assert one_line_errors(exit=False)(lambda: 0)() == 0


@pytest.mark.parametrize(("argv", "line"), [
    ([], "error: files, --format: missing (required) (see app --help)\n"),
    (["f", "--format", "x"], "error: --format: invalid choice: 'x' (choose from 'a', 'b') (see app --help)\n"),
    (["f", "--format", "a", "--threads", "two"], "error: --threads: invalid int value: 'two' (see app --help)\n"),
    (["f", "--format", "a", "--nope"], "error: arguments: unrecognized arguments: --nope (see app --help)\n"),
])
def test_argument_parser_usage_errors_are_one_line(argv: list[str], line: str, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QAT_DEBUG", raising=False)
    parser = ArgumentParser(prog="app")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--format", required=True, choices=["a", "b"])
    parser.add_argument("-t", "--threads", type=int)
    assert one_line_errors(exit=False)(parser.parse_args)(argv) == 2
    assert capsys.readouterr().err == line


class _ExplodingBatchNorm(nn.Module):
    """A conv and a batch norm whose gamma jumps 60x before the loss turns infinite (issue 21's divergence)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _exploding_loss(device: torch.device, memory_format: torch.memory_format = torch.contiguous_format):  # type: ignore[no-untyped-def]
    def loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            model.bn.weight.mul_(60.0)  # type: ignore[union-attr, operator]
        return model(batch).sum() * float("inf"), batch.shape[0]

    return loss


@pytest.mark.parametrize("phase", ["float", "qat"])
def test_divergence_names_the_parameter_that_grew_and_the_batch_norm_key(phase: str, tmp_path: Path) -> None:
    """The divergence guard names the layer that exploded and, for a batch norm in fine-tuning, the schedule key
    that freezes it (issue 21 item 3), beside the learning-rate key."""
    with pytest.raises(QatError) as exc:
        engine.fit(_ExplodingBatchNorm(), [torch.ones(2, 3, 6, 6)], engine.Task(loss=_exploding_loss),
                   train=DetectTrainConfig(), optim=OptimConfig(), seed=0, phase=phase, epochs=1, lr=0.1,
                   checkpoint=tmp_path / f"{phase}_last.pt")
    assert "the parameter that grew most is bn.weight (60x its norm when the phase began)" in exc.value.problem
    assert ("schedule.bn_freeze_step=0" in exc.value.fix) is (phase == "qat")
