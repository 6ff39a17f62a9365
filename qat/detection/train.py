"""Detection as a task of the one training engine (:mod:`qat.train.engine`): the SSD batch loss (Liu et al. 2016
eq. 1), and the COCO evaluation that ``train.keep_best`` and the pipeline use."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from qat.detection.detector import SSDLiteDetector
from qat.detection.metric import coco_ground_truth, coco_map, to_coco_detections
from qat.train.distributed import global_sum
from qat.train.engine import Task
from qat.train.loop import BatchLoss, progress


def detection_loss(device: torch.device, memory_format: torch.memory_format = torch.contiguous_format) -> BatchLoss:
    """SSD's loss of an ``(images, targets)`` batch: box regression + classification with hard negatives 3:1
    (Liu et al. 2016 eq. 1), computed on ``device``. The images are a list of any sizes that the detector's own
    transform resizes and stacks, so ``memory_format`` applies to the detector's weights only.

    Eq. 1 divides by N, the matched default boxes of the batch. Under DDP that is the global batch's N, summed
    over the ranks (times the world size, since DDP averages the ranks' gradients): the gradients are then those
    of one process on the global batch, as torchvision's detection references leave them only approximately."""

    def loss(detector: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        images, targets = batch
        losses = detector([image.to(device, non_blocking=True) for image in images],
                          [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets])
        matched = torch.as_tensor(losses["num_foreground"], dtype=torch.float32, device=device)
        matched_global, world_size = global_sum(matched)
        scale = matched.clamp(min=1) * world_size / matched_global.clamp(min=1)
        return (losses["bbox_regression"] + losses["classification"]) * scale, len(images)

    return loss


def detection_task(val: DataLoader, annotations: dict[str, Any], category_ids: list[int]) -> Task:
    """Detection on the training engine: the SSD loss, and the COCO mAP on ``val`` by which ``train.keep_best``
    keeps the best weights."""
    return Task(loss=detection_loss, metric="mAP",
                validate=lambda detector: evaluate(detector, val, annotations, category_ids, desc="val")["map"])


@torch.no_grad()
def detect_batch(detector: SSDLiteDetector, images: list[torch.Tensor], targets: list[dict[str, Any]],
                 category_ids: list[int]) -> list[dict[str, Any]]:
    """COCO-format detections of ``detector`` (in eval mode) on one batch, run on the detector's device, in
    original image coordinates."""
    weight = next(detector.parameters(), None)  # an engine's core has none: it runs on the CPU
    device = weight.device if weight is not None else torch.device("cpu")
    outputs = [{k: v.cpu() for k, v in out.items()} for out in detector([i.to(device) for i in images])]
    return to_coco_detections(outputs, targets, category_ids, detector.resolution)


def detect(detector: SSDLiteDetector, loader: DataLoader, category_ids: list[int], desc: str = "eval"
           ) -> list[dict[str, Any]]:
    """COCO-format detections of ``detector`` over ``loader`` (:func:`detect_batch`)."""
    detector.eval()
    results: list[dict[str, Any]] = []
    for images, targets in progress(loader, len(loader), desc):
        results += detect_batch(detector, images, targets, category_ids)
    return results


def evaluate(detector: SSDLiteDetector, loader: DataLoader, annotations: dict[str, Any], category_ids: list[int],
             desc: str = "eval") -> dict[str, Any]:
    """COCO mAP (and AP50, AP75, per size) of ``detector`` on the images of ``loader``."""
    return score(detect(detector, loader, category_ids, desc), loader, annotations)


def score(detections: list[dict[str, Any]], loader: DataLoader, annotations: dict[str, Any]) -> dict[str, Any]:
    """COCO mAP of ``detections`` over the images of ``loader``."""
    image_ids = list(loader.dataset.ids)  # type: ignore[attr-defined]
    return coco_map(coco_ground_truth(annotations), detections, image_ids)


__all__ = ["detect", "detect_batch", "detection_loss", "detection_task", "evaluate", "score"]
