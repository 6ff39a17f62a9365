"""Object detection as a task of the one run pipeline (:mod:`qat.task`, :mod:`qat.pipeline`): COCO-layout data
(the synthetic set is generated on first use), SSDLite whose core (backbone + heads) is quantized while box
decoding and NMS stay in float around it (TFLite's detection post-process op), COCO mAP through COCOeval
(Jacob et al. 2018 Table 4.4), and the integer core's outputs against the simulated core's in output LSBs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.classification import cache_dir
from qat.detection.data import CocoDetectionSet, check_split, detection_loader, detection_transforms
from qat.detection.detector import SSDLiteDetector
from qat.detection.metric import METRICS
from qat.detection.models import BACKBONES, build_detector
from qat.detection.synthetic import make_synthetic_coco
from qat.detection.train import detect_batch, detection_task, evaluate, score
from qat.errors import QatError, choice_error
from qat.fidelity import BuiltEngine, on_engines, output_lsb
from qat.intmodel.graph import IntModel
from qat.models.registry import count_macs
from qat.task import Evaluation, TaskData
from qat.train.distributed import Runtime
from qat.train.engine import Task

log = logging.getLogger("qat")

DATASETS = ("synthetic", "coco")


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {name: result[name] for name in METRICS}


def with_core(detector: SSDLiteDetector, core: nn.Module | Callable[[torch.Tensor], torch.Tensor]
              ) -> SSDLiteDetector:
    """``detector``'s shell around another core (simulated, or an int8 engine)."""
    return SSDLiteDetector(core, detector.shell, detector.level_shapes,  # type: ignore[arg-type]
                           detector.anchors_per_location, detector.num_classes)


def _core_inputs(detector: SSDLiteDetector, loader: Iterable, device: torch.device
                 ) -> Iterator[tuple[torch.Tensor, None]]:
    for images, _ in loader:
        yield detector.shell.transform([i.to(device) for i in images])[0].tensors, None


class DetectionTask:
    """SSDLite detection (:class:`qat.task.RunTask`)."""

    name = "detection"
    objective = "map"
    float_key_prefix = "det-"

    def validate(self, cfg: Any) -> None:
        if cfg.model.backbone not in BACKBONES:
            raise choice_error("model.backbone", cfg.model.backbone, list(BACKBONES))
        if cfg.data.name not in DATASETS:
            raise choice_error("data.name", cfg.data.name, DATASETS)
        if cfg.data.name == "coco" and not cfg.data.root:
            raise QatError("data.root", "is not set", "give the folder holding train2017/, val2017/, annotations/")

    def load_data(self, cfg: Any, distributed: bool) -> TaskData:
        d = cfg.data
        if d.name == "synthetic":
            root = make_synthetic_coco(cache_dir(cfg) / "data", **asdict(d.synthetic))
        else:
            root = Path(str(d.root)).expanduser()
        train_split = check_split(root, d.train_split, keep_annotations=False)
        val_split = check_split(root, d.val_split)
        if train_split.category_ids != val_split.category_ids:
            raise QatError(str(val_split.annotation_file), "lists other categories than the training annotations",
                           f"use the same categories as {train_split.annotation_file}")
        res = cfg.model.resolution
        train_set = CocoDetectionSet(train_split, detection_transforms(res, True, d.hflip), d.max_train_images)
        val_set = CocoDetectionSet(val_split, detection_transforms(res, False), d.max_val_images)
        info = {"name": d.name, "root": str(root), "num_categories": val_split.num_categories,
                "categories": val_split.category_names, "train_size": len(train_set), "val_size": len(val_set)}
        return TaskData(detection_loader(train_set, d.batch_size, True, d.workers, cfg.seed, distributed),
                        detection_loader(val_set, d.eval_batch_size, False, d.workers), info, extra=val_split)

    def build_model(self, cfg: Any, data: TaskData) -> nn.Module:
        m = cfg.model
        return build_detector(m.backbone, num_categories=data.info["num_categories"], width_mult=m.width_mult,
                              resolution=m.resolution, weights=m.weights, backbone_weights=m.backbone_weights)

    def model_name(self, cfg: Any) -> str:
        return f"ssdlite_{cfg.model.backbone}"

    def core(self, model: nn.Module) -> nn.Module:
        return model.core  # type: ignore[return-value]

    def with_core(self, model: nn.Module, core: nn.Module | Any) -> nn.Module:
        return with_core(model, core)  # type: ignore[arg-type]

    def core_input(self, model: nn.Module, images: Any, device: torch.device) -> torch.Tensor:
        return model.shell.transform([i.to(device) for i in images])[0].tensors  # type: ignore[operator]

    def calibration_batches(self, cfg: Any, data: TaskData, model: nn.Module, device: torch.device
                            ) -> Iterable[tuple[torch.Tensor, Any]]:
        d = cfg.data
        split = check_split(Path(data.info["root"]), d.train_split, keep_annotations=False)
        images = CocoDetectionSet(split, detection_transforms(cfg.model.resolution, False), d.max_train_images)
        loader = detection_loader(images, d.batch_size, True, d.workers, cfg.seed, False)
        return _core_inputs(model, loader, device)  # type: ignore[arg-type]

    def train_task(self, data: TaskData, runtime: Runtime) -> Task:
        return detection_task(data.val, data.extra.coco, data.extra.category_ids)

    def _evaluate(self, detector: nn.Module, data: TaskData, desc: str) -> Evaluation:
        result = evaluate(detector, data.val, data.extra.coco, data.extra.category_ids, desc=desc)  # type: ignore[arg-type]
        return Evaluation(_metrics(result), record={"coco_summary": result["summary"]})

    def evaluate(self, model: nn.Module, data: TaskData, desc: str, device: torch.device) -> Evaluation:
        return self._evaluate(model, data, desc)

    def headline(self, metrics: dict[str, float]) -> str:
        return f"mAP {metrics['map']:.2f}  AP50 {metrics['map_50']:.2f}"

    def fidelity(self, int_model: IntModel, prepared: nn.Module, model: nn.Module, data: TaskData,
                 simulated: Evaluation, names: list[str], primary: str, threads: int, device: torch.device
                 ) -> tuple[dict[str, Any], Evaluation]:
        """COCO mAP of the integer detector on every engine (one shared pass over the validation images), and each
        engine's core outputs against the simulated core on the first validation batch, in output LSBs."""
        lsb = output_lsb(int_model)
        if lsb is None:
            raise QatError("quant", "the detection core's output has no quantizer, so there is no LSB to compare in",
                           "keep the core's output quantized (the default prepare does)")
        images, _ = next(iter(data.val))
        x = self.core_input(model, images, torch.device("cpu"))
        prepared.eval()
        with torch.no_grad():
            reference_out = prepared(x)
        detections: dict[str, list[dict[str, Any]]] = {}
        diffs: dict[str, torch.Tensor] = {}
        detectors: dict[str, SSDLiteDetector] = {}
        category_ids = data.extra.category_ids
        evaluations: dict[str, Evaluation] = {}

        def feed(engine: BuiltEngine, batch: Any) -> None:
            if engine.name not in diffs:
                with torch.no_grad():
                    diffs[engine.name] = (engine.run(x) - reference_out).abs() / lsb
            if engine.name not in detectors:
                detectors[engine.name] = with_core(model, engine.run).eval()  # type: ignore[arg-type]
            detections.setdefault(engine.name, []).extend(detect_batch(detectors[engine.name], *batch, category_ids))

        def finish(engine: BuiltEngine) -> dict[str, Any]:
            result = score(detections[engine.name], data.val, data.extra.coco)
            evaluations[engine.name] = Evaluation(_metrics(result), record={"coco_summary": result["summary"]})
            diff = diffs[engine.name]
            log.info("[fidelity] %-20s mAP %.2f  core max |Δ| %.1f LSB, mean %.3f LSB", engine.name,
                     evaluations[engine.name].metrics["map"], float(diff.max()), float(diff.mean()))
            return {**evaluations[engine.name].metrics, "core_max_abs_diff_lsb": float(diff.max()),
                    "core_mean_abs_diff_lsb": float(diff.mean()),
                    "core_within_1lsb": float((diff <= 1 + 1e-3).float().mean() * 100)}

        engines = on_engines(int_model, names, primary, threads, data.val, feed, finish, device)
        main = engines[primary]
        block = {"primary_engine": primary, "output_lsb": lsb, "engines": engines,
                 "core_max_abs_diff_lsb": main["core_max_abs_diff_lsb"],
                 "core_mean_abs_diff_lsb": main["core_mean_abs_diff_lsb"],
                 "engine_8bit_container": bool(main.get("emulated_bits", False))}
        log.info("[int8] %s %s (simulated %s)", primary, self.headline(evaluations[primary].metrics),
                 self.headline(simulated.metrics))
        return block, evaluations[primary]

    def int_meta(self, cfg: Any, model: nn.Module, data: TaskData) -> dict[str, Any]:
        m = cfg.model
        return {"backbone": m.backbone, "width_mult": m.width_mult, "resolution": m.resolution,
                "num_classes": model.num_classes, "level_shapes": model.level_shapes,
                "anchors_per_location": model.anchors_per_location}

    def latency_model(self, cfg: Any, data: TaskData, model: nn.Module, scratch: Path | None) -> dict[str, Any]:
        m = cfg.model
        fields = {"task": "detection", "arch": m.backbone, "width_mult": m.width_mult,
                  "num_classes": data.info["num_categories"], "resolution": m.resolution}
        if scratch is not None:  # the float detector's own weights: its scores decide how many boxes reach NMS
            fields["weights"] = str(scratch / "detector.pt")
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, fields["weights"])
        return fields

    def float_latency_engine(self, cfg: Any, primary: str) -> str:
        """The float baseline runs on the int8 engine when it has a float path, else PyTorch eager."""
        from qat.engines import registry

        return primary if "float" in registry.entry(primary).precisions else "torch_eager"

    def record_model(self, cfg: Any, model: nn.Module, data: TaskData, float_source: str) -> dict[str, Any]:
        m = cfg.model
        return {"arch": self.model_name(cfg), "backbone": m.backbone, "width_mult": m.width_mult,
                "resolution": m.resolution, "num_classes": model.num_classes,
                "params": sum(p.numel() for p in model.parameters()),
                "macs": count_macs(model.core, m.resolution), "float_source": float_source}  # type: ignore[arg-type]


DETECTION = DetectionTask()

__all__ = ["DATASETS", "DETECTION", "DetectionTask", "with_core"]
