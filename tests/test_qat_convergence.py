"""QAT that converges at small batches (issue 21): the default recipe (EMA ranges, batch norm folded with the float
model's running statistics from the first fine-tuning step) trains a MobileNet v2 for 200 steps of 16 images in
every BN fold mode without a non-finite loss, and its loss goes down."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyResidualNet
from torch.utils.data import DataLoader, TensorDataset

from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare
from qat.quant.schedule import QuantSchedule
from qat.schema import TrainConfig
from qat.tracking import RunLogger
from qat.train import engine
from qat.train.loop import OptimConfig, classification_loss

CLASSES, IMAGES, BATCH = 4, 320, 16  # 20 steps per epoch


class _Losses(RunLogger):
    def __init__(self) -> None:
        super().__init__()
        self.losses: dict[str, list[float]] = {}

    def log_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        self.losses.setdefault(phase, []).append(metrics["loss"])


def _loader() -> DataLoader:
    """Learnable images: a class-dependent colour under strong noise."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(IMAGES) % CLASSES
    images = torch.randn(CLASSES, 3, 1, 1, generator=generator)[labels] + 0.8 * torch.randn(
        IMAGES, 3, 32, 32, generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("bn_fold", ["jacob", "whitepaper", "unfolded"])
def test_default_recipe_trains_200_steps_of_16_images_in_every_bn_mode(bn_fold: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny layers: one thread is the fastest
    loader, tracker = _loader(), _Losses()
    train = TrainConfig(keep_best=False, channels_last=False)
    model = TinyResidualNet()  # conv-BN-ReLU, a residual block with two conv-BN: three folded batch norms
    engine.fit(model, loader, engine.Task(loss=classification_loss), train=train, optim=OptimConfig(), seed=0,
               phase="float", epochs=2, lr=0.02, checkpoint=tmp_path / "float_last.pt")
    prepared = prepare(model, QuantConfig(bn_fold=bn_fold), torch.zeros(1, 3, 32, 32))
    with calibration_mode(prepared), torch.no_grad():
        for i, (images, _) in enumerate(loader):
            if i == 4:
                break
            prepared(images)
    schedule = QuantSchedule()  # the default recipe's schedule
    assert schedule == QuantSchedule(bn_freeze_step=0)
    engine.fit(prepared, loader, engine.Task(loss=classification_loss), train=train, optim=OptimConfig(), seed=0,
               phase="qat", epochs=10, lr=TrainConfig().qat_lr, checkpoint=tmp_path / "qat_last.pt",
               before_step=lambda step: schedule.apply(prepared, step), tracker=tracker)
    losses = tracker.losses["qat"]
    assert len(losses) == 200 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first, (first, last)
