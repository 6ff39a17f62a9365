"""Synthetic COCO-format set (valid for pycocotools, deterministic, cached) and the COCO loader's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from qat.detection.data import CocoDetectionSet, check_split, detection_transforms
from qat.detection.synthetic import CATEGORY_IDS, make_synthetic_coco
from qat.errors import QatError

TINY = {"train_images": 6, "val_images": 4, "image_size": 64, "num_categories": 3, "max_objects": 3}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("data"), **TINY)


def test_synthetic_set_is_valid_coco(synth: Path) -> None:
    for split, count in (("train2017", 6), ("val2017", 4)):
        coco = COCO(str(synth / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count
        assert sorted(coco.getCatIds()) == list(CATEGORY_IDS[:3])
        assert len(coco.getAnnIds()) >= count  # at least one object per image
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and x + w <= 64 and y >= 0 and y + h <= 64
            assert 0 < ann["area"] <= w * h + 1e-6 and ann["iscrowd"] == 0
        for image in coco.loadImgs(coco.getImgIds()):
            assert (synth / split / image["file_name"]).is_file()


def test_synthetic_set_is_deterministic_and_cached(synth: Path, tmp_path: Path) -> None:
    again = make_synthetic_coco(tmp_path, **TINY)
    assert again.name == synth.name
    for file in sorted(synth.rglob("*")):
        if file.is_file():
            assert file.read_bytes() == (again / file.relative_to(synth)).read_bytes(), file
    stamp = (again / "manifest.json").stat().st_mtime_ns
    assert make_synthetic_coco(tmp_path, **TINY) == again and (again / "manifest.json").stat().st_mtime_ns == stamp


def test_loader_resizes_boxes_and_maps_sparse_category_ids(synth: Path) -> None:
    split = check_split(synth, "val2017")
    data = CocoDetectionSet(split, detection_transforms(96, train=False))
    image, target = data[0]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    anns = [a for a in split.coco["annotations"] if a["image_id"] == target["image_id"]]
    x, y, w, h = anns[0]["bbox"]
    expected = torch.tensor([x, y, x + w, y + h]) * 96 / 64
    assert torch.allclose(target["boxes"][0], expected, atol=1e-4)
    assert [split.category_ids[int(label) - 1] for label in target["labels"]] == [a["category_id"] for a in anns]
    assert target["orig_size"] == (64, 64)


def _copy(synth: Path, tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(synth, root)
    return root


def test_malformed_json_names_the_file(synth: Path, tmp_path: Path) -> None:
    root = _copy(synth, tmp_path)
    ann = root / "annotations" / "instances_val2017.json"
    ann.write_text(ann.read_text()[:-10])
    with pytest.raises(QatError, match="instances_val2017.json: is not valid JSON") as err:
        check_split(root, "val2017")
    assert str(ann) in str(err.value)


def test_missing_image_names_the_image(synth: Path, tmp_path: Path) -> None:
    root = _copy(synth, tmp_path)
    missing = root / "val2017" / "000000000002.jpg"
    missing.unlink()
    with pytest.raises(QatError, match="is missing") as err:
        check_split(root, "val2017")
    assert str(err.value).startswith(str(missing))


def test_empty_categories_names_the_file(synth: Path, tmp_path: Path) -> None:
    root = _copy(synth, tmp_path)
    ann = root / "annotations" / "instances_train2017.json"
    coco = json.loads(ann.read_text())
    coco["categories"] = []
    ann.write_text(json.dumps(coco))
    with pytest.raises(QatError, match="lists no categories") as err:
        check_split(root, "train2017")
    assert str(ann) in str(err.value)


def test_missing_annotation_file_and_unknown_category(synth: Path, tmp_path: Path) -> None:
    root = _copy(synth, tmp_path)
    with pytest.raises(QatError, match="instances_test2017.json: does not exist"):
        check_split(root, "test2017")
    ann = root / "annotations" / "instances_val2017.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["category_id"] = 999
    ann.write_text(json.dumps(coco))
    with pytest.raises(QatError, match="category id 999"):
        check_split(root, "val2017")
