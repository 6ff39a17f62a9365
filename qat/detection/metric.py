"""The official COCO box metric through pycocotools' ``COCOeval`` (Lin et al. 2014; COCO detection eval).

AP averaged over IoU 0.50:0.05:0.95 and the categories (the "mAP" of Jacob et al. 2018 Table 4.4), AP at IoU
0.50 and 0.75, and AP for small (< 32²), medium and large (> 96²) objects, in percent. A size range with no
ground truth has no AP (COCOeval's -1): it is reported as ``None``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")


def coco_ground_truth(annotations: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index over an instances dict (already checked by ``qat.detection.data``)."""
    gt = COCO()
    gt.dataset = copy.deepcopy(annotations)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_map(gt: COCO, detections: list[dict[str, Any]], image_ids: list[int] | None = None) -> dict[str, Any]:
    """COCOeval bbox summary of ``detections`` ({image_id, category_id, bbox [x, y, w, h], score}).

    ``image_ids`` restricts the evaluation to those images (default: every image of ``gt``). No detection at
    all scores 0 on every range that has ground truth.
    """
    image_ids = sorted(gt.getImgIds()) if image_ids is None else sorted(image_ids)
    if not detections:
        stats = [0.0 if _has_gt(gt, image_ids, rng) else -1.0 for rng in ("all", "all", "all", "small", "medium",
                                                                          "large")]
        text = "no detections"
    else:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            dt = gt.loadRes(copy.deepcopy(detections))
            evaluator = COCOeval(gt, dt, "bbox")
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats, text = [float(s) for s in evaluator.stats[:6]], out.getvalue()
    result: dict[str, Any] = {name: (None if s < 0 else 100.0 * s) for name, s in zip(METRICS, stats, strict=True)}
    result["summary"] = text.strip().splitlines()[-12:]
    return result


def _has_gt(gt: COCO, image_ids: list[int], size: str) -> bool:
    low, high = {"all": (0, 1e10), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}[size]
    anns = gt.loadAnns(gt.getAnnIds(imgIds=image_ids, iscrowd=False))
    return any(low <= a["area"] < high for a in anns)


def to_coco_detections(outputs: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]],
                       category_ids: list[int], resolution: tuple[int, int]) -> list[dict[str, Any]]:
    """Detector outputs on resized images -> COCO results in each image's original pixel coordinates."""
    results = []
    for out, target in zip(outputs, targets, strict=True):
        height, width = target["orig_size"]
        scale = torch.tensor([width / resolution[1], height / resolution[0]] * 2)
        boxes = out["boxes"].float() * scale
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        for box, score, label in zip(xywh.tolist(), out["scores"].tolist(), out["labels"].tolist(), strict=True):
            results.append({"image_id": int(target["image_id"]), "category_id": category_ids[int(label) - 1],
                            "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)})
    return results
