"""Image classification as a task of the one run pipeline (:mod:`qat.task`, :mod:`qat.pipeline`): ImageNet-style
folders or the generated demo set, the model registry's networks (the whole network is the quantized core),
top-1/top-5 (Jacob et al. 2018 Table 4.1-4.3) and the integer model's logits against the simulated ones."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.data.calibration import calibration_loader
from qat.data.imagefolder import ClassificationData, build_classification_loaders, check_layout
from qat.data.synthetic import default_cache_dir, make_demo_dataset
from qat.errors import QatError, choice_error
from qat.fidelity import evaluate_engines
from qat.intmodel.graph import IntModel
from qat.models.registry import MODELS, bn_momenta, build_model, count_macs
from qat.task import Evaluation, TaskData
from qat.train.distributed import Runtime
from qat.train.engine import Task
from qat.train.loop import classification_loss, predict, top1, top5

log = logging.getLogger("qat")

DATASETS = ("demo", "imagefolder")


def cache_dir(cfg: Any) -> Path:
    """The run's cache (generated data, float weights): ``cache_dir`` or ``$QAT_CACHE`` or ``~/.cache/qat``."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def load_data(cfg: Any, distributed: bool = False) -> tuple[ClassificationData, dict[str, Any]]:
    """Training and validation loaders of ``cfg.data`` (the demo set is generated on first use) and the record's
    ``data`` block."""
    d = cfg.data
    if d.name == "demo":
        root = make_demo_dataset(cache_dir(cfg) / "data", **asdict(d.demo))
    else:
        root = Path(str(d.root)).expanduser()
    data = build_classification_loaders(root, resolution=cfg.model.resolution, batch_size=d.batch_size,
                                        workers=d.workers, train_crop_scale=tuple(d.train_crop_scale),
                                        resize_ratio=d.resize_ratio, hflip=d.hflip, seed=cfg.seed,
                                        distributed=distributed, in_memory=d.in_memory)
    val = build_classification_loaders(root, resolution=cfg.model.resolution, batch_size=d.eval_batch_size,
                                       workers=d.workers, resize_ratio=d.resize_ratio, seed=cfg.seed,
                                       in_memory=d.in_memory, val_max_images=d.val_max_images,
                                       val_subset_seed=d.val_subset_seed)
    data = ClassificationData(data.train, val.val, data.class_names, val.val_subset)
    info = {"name": d.name, "root": str(root), "num_classes": len(data.class_names),
            "train_size": len(data.train.dataset), "val_size": len(data.val.dataset),
            "val_subset": data.val_subset}
    return data, info


def _on_device(loader: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, Any]]:
    for images, labels in loader:
        yield images.to(device), labels


class ClassificationTask:
    """Classification (:class:`qat.task.RunTask`)."""

    name = "classification"
    objective = "top1"
    float_key_prefix = ""

    def validate(self, cfg: Any) -> None:
        if cfg.model.arch not in MODELS:
            raise choice_error("model.arch", cfg.model.arch, list(MODELS))
        if cfg.data.name not in DATASETS:
            raise choice_error("data.name", cfg.data.name, DATASETS)
        if cfg.data.name == "imagefolder":
            if not cfg.data.root:
                raise QatError("data.root", "is not set", "give the folder holding train/ and val/")
            check_layout(cfg.data.root)

    def load_data(self, cfg: Any, distributed: bool) -> TaskData:
        data, info = load_data(cfg, distributed)
        return TaskData(data.train, data.val, info)

    def build_model(self, cfg: Any, data: TaskData) -> nn.Module:
        m = cfg.model
        return build_model(m.arch, width_mult=m.width_mult, num_classes=data.info["num_classes"],
                           resolution=m.resolution, weights=m.weights, bn_momentum=m.bn_momentum)

    def model_name(self, cfg: Any) -> str:
        return str(cfg.model.arch)

    def core(self, model: nn.Module) -> nn.Module:
        return model

    def with_core(self, model: nn.Module, core: nn.Module | Any) -> nn.Module:
        return core

    def core_input(self, model: nn.Module, images: Any, device: torch.device) -> torch.Tensor:
        return images.to(device)

    def calibration_batches(self, cfg: Any, data: TaskData, model: nn.Module, device: torch.device
                            ) -> Iterable[tuple[torch.Tensor, Any]]:
        d = cfg.data
        loader = calibration_loader(data.info["root"], resolution=cfg.model.resolution, batch_size=d.batch_size,
                                    seed=cfg.seed, resize_ratio=d.resize_ratio, workers=d.workers)
        return _on_device(loader, device)

    def train_task(self, data: TaskData, runtime: Runtime) -> Task:
        def validate(trained: nn.Module) -> float:
            _, predicted, targets = predict(trained, data.val, desc="val", device=runtime.device)
            return top1(predicted, targets)

        return Task(loss=classification_loss, validate=validate)

    def evaluate(self, model: nn.Module, data: TaskData, desc: str, device: torch.device) -> Evaluation:
        logits, predicted, targets = predict(model, data.val, desc=desc, device=device)
        return Evaluation({"top1": top1(predicted, targets), "top5": top5(logits, targets)},
                          outputs=(logits, predicted, targets))

    def headline(self, metrics: dict[str, float]) -> str:
        return f"top-1 {metrics['top1']:.2f}%"

    def fidelity(self, int_model: IntModel, prepared: nn.Module, model: nn.Module, data: TaskData,
                 simulated: Evaluation, names: list[str], primary: str, threads: int, device: torch.device
                 ) -> tuple[dict[str, Any], Evaluation]:
        sim_logits, sim_pred, targets = simulated.outputs
        block, logits = evaluate_engines(int_model, data.val, sim_logits, sim_pred, targets, names, primary, threads,
                                         device)
        log.info("[int8] %s top-1 %.2f%%  (agreement with simulated %.2f%%; lowest over engines %.2f%%)", primary,
                 block["engines"][primary]["top1"], block["sim_vs_int_top1_agreement"],
                 block["min_agreement_with_sim"])
        return block, Evaluation({"top1": block["engines"][primary]["top1"], "top5": top5(logits, targets)})

    def int_meta(self, cfg: Any, model: nn.Module, data: TaskData) -> dict[str, Any]:
        return {"arch": cfg.model.arch, "width_mult": cfg.model.width_mult, "resolution": cfg.model.resolution,
                "num_classes": data.info["num_classes"]}

    def latency_model(self, cfg: Any, data: TaskData, model: nn.Module, scratch: Path | None) -> dict[str, Any]:
        # float models are timed with the run's architecture: the weights do not change the work done
        return {"arch": cfg.model.arch, "width_mult": cfg.model.width_mult, "num_classes": data.info["num_classes"],
                "resolution": cfg.model.resolution}

    def float_latency_engine(self, cfg: Any, primary: str) -> str:
        return "torch_eager"

    def record_model(self, cfg: Any, model: nn.Module, data: TaskData, float_source: str) -> dict[str, Any]:
        m = cfg.model
        return {"arch": m.arch, "width_mult": m.width_mult, "resolution": m.resolution,
                "num_classes": data.info["num_classes"], "params": sum(p.numel() for p in model.parameters()),
                "bn_momentum": bn_momenta(model),
                "macs": count_macs(model, m.resolution), "float_source": float_source}


CLASSIFICATION = ClassificationTask()

__all__ = ["CLASSIFICATION", "DATASETS", "ClassificationTask", "cache_dir", "load_data"]
