"""Detection training (SSD losses, Liu et al. 2016 eq. 1) and COCO evaluation loops, resumable per epoch."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from qat.detection.detector import SSDLiteDetector
from qat.detection.metric import coco_ground_truth, coco_map, to_coco_detections
from qat.errors import QatError
from qat.train.checkpoint import load_checkpoint, save_checkpoint
from qat.train.loop import OptimConfig, build_optimizer, lr_at, progress

log = logging.getLogger("qat")


def train_epoch(detector: SSDLiteDetector, loader: DataLoader, optimizer: torch.optim.Optimizer, *, step: int,
                lr_fn: Callable[[int], float], before_step: Callable[[int], None] | None = None,
                desc: str = "train", lr_key: str = "optim.lr") -> tuple[int, float]:
    """One pass: loss = box regression + classification (hard negatives 3:1); returns (next step, mean loss).

    A non-finite loss is an error naming ``lr_key``, the config key of this phase's learning rate."""
    detector.train()
    total, count = 0.0, 0
    for images, targets in progress(loader, len(loader), desc):
        if before_step is not None:
            before_step(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_fn(step)
        losses = detector(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        loss = losses["bbox_regression"] + losses["classification"]
        if not torch.isfinite(loss):
            raise QatError(lr_key, f"loss became {loss.item()} at step {step}",
                           f"lower {lr_key}; the last good checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(images)
        count += len(images)
        step += 1
    return step, total / max(count, 1)


def fit(detector: SSDLiteDetector, loader: DataLoader, optim: OptimConfig, *, phase: str, epochs: int, lr: float,
        checkpoint: Path, seed: int, before_step: Callable[[int], None] | None = None,
        lr_key: str = "optim.lr") -> SSDLiteDetector:
    """Train ``epochs`` epochs, checkpointing atomically each epoch; resume from ``checkpoint`` if present.

    ``lr_key`` is the config key ``lr`` comes from (``optim.lr`` for float training, ``train.qat_lr`` for QAT),
    named by the error a diverging loss raises."""
    optimizer = build_optimizer(detector, optim, lr)
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch
    start_epoch, step = 0, 0
    if checkpoint.exists():
        state = load_checkpoint(checkpoint)
        detector.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        log.info("[%s] resuming from %s at epoch %d", phase, checkpoint, start_epoch)
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        torch.manual_seed(seed * 1000 + epoch)  # shuffle and augmentation depend only on (seed, epoch)
        if loader.generator is not None:
            loader.generator.manual_seed(seed * 1000 + epoch)
        step, loss = train_epoch(detector, loader, optimizer, step=step, before_step=before_step,
                                 lr_fn=lambda s: lr_at(optim, lr, s, total, steps_per_epoch),
                                 desc=f"{phase} {epoch + 1}/{epochs}", lr_key=lr_key)
        save_checkpoint(checkpoint, {"model": detector.state_dict(), "optimizer": optimizer.state_dict(),
                                     "epoch": epoch + 1, "step": step, "phase": phase})
        log.info("[%s] epoch %d/%d  loss %.4f  (%.1f s)", phase, epoch + 1, epochs, loss, time.time() - t0)
    return detector


@torch.no_grad()
def detect(detector: SSDLiteDetector, loader: DataLoader, category_ids: list[int], desc: str = "eval"
           ) -> list[dict[str, Any]]:
    """COCO-format detections of ``detector`` over ``loader``, in original image coordinates."""
    detector.eval()
    results: list[dict[str, Any]] = []
    for images, targets in progress(loader, len(loader), desc):
        outputs = detector(images)
        results += to_coco_detections(outputs, targets, category_ids, detector.resolution)
    return results


def evaluate(detector: SSDLiteDetector, loader: DataLoader, annotations: dict[str, Any], category_ids: list[int],
             desc: str = "eval") -> dict[str, Any]:
    """COCO mAP (and AP50, AP75, per size) of ``detector`` on the images of ``loader``."""
    detections = detect(detector, loader, category_ids, desc)
    image_ids = list(loader.dataset.ids)  # type: ignore[attr-defined]
    return coco_map(coco_ground_truth(annotations), detections, image_ids)
