"""COCO metric through the real pycocotools COCOeval."""

from __future__ import annotations

import pytest
import torch

from qat.detection.data import check_split
from qat.detection.metric import coco_ground_truth, coco_map, to_coco_detections
from qat.detection.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = make_synthetic_coco(tmp_path_factory.mktemp("data"), train_images=1, val_images=12, image_size=160,
                               num_categories=4, max_objects=3)
    return check_split(root, "val2017")


def _ground_truth_as_detections(coco: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in coco["annotations"]]


def test_ground_truth_as_predictions_scores_ap_one(split) -> None:  # type: ignore[no-untyped-def]
    result = coco_map(coco_ground_truth(split.coco), _ground_truth_as_detections(split.coco))
    assert result["map"] == pytest.approx(100.0) and result["map_50"] == pytest.approx(100.0)
    assert result["map_75"] == pytest.approx(100.0)
    for size in ("map_small", "map_medium", "map_large"):  # sizes with no ground truth have no AP
        assert result[size] is None or result[size] == pytest.approx(100.0)
    assert sum(result[s] is not None for s in ("map_small", "map_medium", "map_large")) >= 2


def test_wrong_boxes_and_labels_lower_ap(split) -> None:  # type: ignore[no-untyped-def]
    gt = coco_ground_truth(split.coco)
    shifted = _ground_truth_as_detections(split.coco)
    for det in shifted:
        x, y, w, h = det["bbox"]
        det["bbox"] = [x + 0.3 * w, y, w, h]  # IoU 0.54: counts at 0.5, not at 0.75
    result = coco_map(gt, shifted)
    assert result["map_50"] == pytest.approx(100.0) and result["map_75"] == pytest.approx(0.0)
    assert 0 < result["map"] < 100
    relabelled = _ground_truth_as_detections(split.coco)
    ids = split.category_ids
    for det in relabelled:
        det["category_id"] = ids[(ids.index(det["category_id"]) + 1) % len(ids)]
    assert coco_map(gt, relabelled)["map"] == pytest.approx(0.0)
    assert coco_map(gt, [])["map"] == 0.0


def test_detections_are_mapped_back_to_original_pixels_and_category_ids() -> None:
    outputs = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([2])}]
    targets = [{"image_id": 7, "orig_size": (200, 400)}]  # (h, w); the model saw 100 x 100
    (det,) = to_coco_detections(outputs, targets, [3, 8, 11], (100, 100))
    assert det["image_id"] == 7 and det["category_id"] == 8
    assert det["bbox"] == pytest.approx([40.0, 40.0, 80.0, 80.0]) and det["score"] == pytest.approx(0.9)
