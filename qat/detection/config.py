"""Typed configuration of one detection run (registered in Hydra's ConfigStore by ``experiments/detect.py``).

The quantization, schedule, optimizer and latency groups are the classification run's own (``qat.schema``),
so every knob of the quantization core applies unchanged to the detector's backbone and heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qat.detection.synthetic import SYNTH_DEFAULTS
from qat.ptq.config import PtqConfig
from qat.quant.schedule import QuantSchedule
from qat.schema import LatencyConfig, LoggerConfig, QuantGroup, TargetConfig, TrainConfig
from qat.train.loop import OptimConfig


@dataclass
class DetectModelConfig:
    backbone: str = "mobilenet_v2"  # mobilenet_v1 | mobilenet_v2 | mobilenet_v3_large
    width_mult: float = 1.0  # depth multiplier of backbone and extra layers (Jacob Table 4.4: 1.0, 0.5)
    resolution: int = 320
    weights: str | None = None  # local float state dict of the whole detector; skips float training
    backbone_weights: str | None = None  # local state dict of the torchvision classification backbone


@dataclass
class SyntheticCocoConfig:
    train_images: int = SYNTH_DEFAULTS["train_images"]
    val_images: int = SYNTH_DEFAULTS["val_images"]
    image_size: int = SYNTH_DEFAULTS["image_size"]
    num_categories: int = SYNTH_DEFAULTS["num_categories"]
    max_objects: int = SYNTH_DEFAULTS["max_objects"]
    seed: int = SYNTH_DEFAULTS["seed"]


@dataclass
class DetectDataConfig:
    name: str = "synthetic"  # synthetic (generated on first use) | coco (COCO 2017 layout under root)
    root: str | None = None
    train_split: str = "train2017"
    val_split: str = "val2017"
    batch_size: int = 32
    eval_batch_size: int = 32
    workers: int = 0
    hflip: float = 0.5
    max_train_images: int | None = None  # first N training images (all by default)
    max_val_images: int | None = None  # first N validation images (COCO val2017 has 5000)
    synthetic: SyntheticCocoConfig = field(default_factory=SyntheticCocoConfig)


@dataclass
class DetectTrainConfig(TrainConfig):
    """The classification run's ``train`` group (one schema: every ``train.*`` key of ``experiments/run.py`` is a
    key here, with the same meaning), with detection's defaults: SSDLite trains longer, and ``keep_best`` (a COCO
    evaluation after every epoch) is off."""

    float_epochs: int = 30
    keep_best: bool = False


@dataclass
class DetectRunConfig:
    """The classification run's schema (:class:`qat.schema.RunConfig`) with detection's ``model``, ``data`` and
    ``train`` defaults: every other group is the same one."""

    tag: str = "detect"
    seed: int = 0
    method: str = "qat"  # qat: calibrate + QAT fine-tuning | ptq: the post-training methods of ptq/ only
    cache_dir: str | None = None  # default $QAT_CACHE or ~/.cache/qat
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    quant: QuantGroup = field(default_factory=QuantGroup)
    schedule: QuantSchedule = field(default_factory=QuantSchedule)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: DetectTrainConfig = field(default_factory=DetectTrainConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ptq: PtqConfig = field(default_factory=PtqConfig)  # used when method=ptq
