"""The seam between the one run pipeline (:mod:`qat.pipeline`) and a task (classification, detection).

The pipeline owns every step that is the same for all tasks: float weights (train or reuse), prepare,
calibrate, QAT or PTQ, the deployment target, conversion, the engines' fidelity, latency in fresh
subprocesses and the record. A task supplies only what differs: its data, its model and which part of it is
quantized (the *core*; a detector keeps box decoding and NMS in float around it, as TFLite's post-process op),
its loss and metric, and how its integer model is compared with the simulated one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from qat.intmodel.graph import IntModel
from qat.train.distributed import Runtime
from qat.train.engine import Task


@dataclass
class TaskData:
    """A task's loaders and the record's ``data`` block (``info``); ``extra`` is the task's own (COCO split)."""

    train: DataLoader
    val: DataLoader
    info: dict[str, Any]
    extra: Any = None


@dataclass
class Evaluation:
    """One model evaluated on the validation set: ``metrics`` are the record's accuracy fields without their
    stage prefix (``top1``, ``top5`` | ``map``, ``map_50``, ...); ``outputs`` what fidelity compares against
    (classification: logits, predictions, labels); ``record`` fields the task adds to the record."""

    metrics: dict[str, float]
    outputs: Any = None
    record: dict[str, Any] = field(default_factory=dict)


class RunTask(Protocol):
    """What a task gives the pipeline (see the module docstring)."""

    name: str  # the record's "task"
    objective: str  # the accuracy key a sweep optimises (top1 | map)
    float_key_prefix: str  # float-weight cache names (keeps earlier caches valid)

    def validate(self, cfg: Any) -> None:
        """Cheap checks of the task's own names and paths (model, data) before any work."""

    def load_data(self, cfg: Any, distributed: bool) -> TaskData: ...

    def build_model(self, cfg: Any, data: TaskData) -> nn.Module: ...

    def model_name(self, cfg: Any) -> str:
        """The architecture's name in model ids and records."""

    def core(self, model: nn.Module) -> nn.Module:
        """The part of ``model`` that is quantized and converted to the integer model."""

    def with_core(self, model: nn.Module, core: nn.Module | Any) -> nn.Module:
        """``model`` with ``core`` (simulated, or an int8 engine) in place of its core."""

    def core_input(self, model: nn.Module, images: Any, device: torch.device) -> torch.Tensor:
        """A batch of the loaders' images as the core's input tensor."""

    def calibration_batches(self, cfg: Any, data: TaskData, model: nn.Module, device: torch.device
                            ) -> Iterable[tuple[torch.Tensor, Any]]:
        """Core inputs for post-training methods: training images through the evaluation transform."""

    def train_task(self, data: TaskData, runtime: Runtime) -> Task: ...

    def evaluate(self, model: nn.Module, data: TaskData, desc: str, device: torch.device) -> Evaluation: ...

    def headline(self, metrics: dict[str, float]) -> str:
        """One log line's worth of ``metrics``."""

    def fidelity(self, int_model: IntModel, prepared: nn.Module, model: nn.Module, data: TaskData,
                 simulated: Evaluation, names: list[str], primary: str, threads: int, device: torch.device
                 ) -> tuple[dict[str, Any], Evaluation]:
        """The record's fidelity block (every engine of ``names`` against the simulated model, in one pass over the
        validation data; the reference on ``device``) and the primary engine's evaluation."""

    def int_meta(self, cfg: Any, model: nn.Module, data: TaskData) -> dict[str, Any]:
        """What the integer model file needs to be rebuilt around (e.g. the detector's shell)."""

    def latency_model(self, cfg: Any, data: TaskData, model: nn.Module, scratch: Path | None) -> dict[str, Any]:
        """:class:`qat.latency.subprocess.MeasureSpec` fields that build the model in the child; float weights the
        child needs are written under ``scratch`` (``None``: an int8 measurement, which needs none)."""

    def float_latency_engine(self, cfg: Any, primary: str) -> str:
        """The engine the float baseline is timed on."""

    def record_model(self, cfg: Any, model: nn.Module, data: TaskData, float_source: str) -> dict[str, Any]:
        """The record's ``model`` block."""


__all__ = ["Evaluation", "RunTask", "TaskData"]
