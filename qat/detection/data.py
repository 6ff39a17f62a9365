"""COCO 2017 layout through torchvision's ``CocoDetection`` and transforms v2, checked before any work.

    <root>/train2017/*.jpg   <root>/val2017/*.jpg   <root>/annotations/instances_{train,val}2017.json

Checks, each a one-line :class:`QatError` naming the file: unreadable or malformed annotation JSON, missing
``images``/``annotations``/``categories``, no categories, annotations pointing at unknown images or
categories, image files missing for annotated images. Category ids (COCO's have gaps) map to contiguous
labels 1..C (0 is SSD's background); :class:`CocoSplit` keeps the map for the metric.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from qat.errors import QatError


@dataclass
class CocoSplit:
    """One checked split: its files, its categories in label order, and its annotation JSON."""

    images_dir: Path
    annotation_file: Path
    category_ids: list[int]  # label l (1..C) is category_ids[l - 1]
    category_names: list[str]
    coco: dict[str, Any]

    @property
    def num_categories(self) -> int:
        return len(self.category_ids)


def check_split(root: str | Path, split: str, keep_annotations: bool = True) -> CocoSplit:
    """Read and check ``<root>/annotations/instances_<split>.json`` and the images it names.

    ``keep_annotations=False`` drops the parsed JSON once checked (COCO's training file is ~450 MB; the
    loader reads its own copy), leaving ``coco`` empty."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise QatError("data.root", f"{root} is not a directory", "give the folder holding train2017/, val2017/, "
                       "annotations/")
    ann_file = root / "annotations" / f"instances_{split}.json"
    images_dir = root / split
    if not ann_file.is_file():
        raise QatError(str(ann_file), "does not exist", f"COCO layout: {root}/annotations/instances_{split}.json")
    try:
        coco = json.loads(ann_file.read_text())
    except json.JSONDecodeError as exc:
        raise QatError(str(ann_file), f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                       "re-download or regenerate the annotation file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise QatError(str(ann_file), f"cannot be read ({type(exc).__name__})", "check the file") from exc
    if not isinstance(coco, dict):
        raise QatError(str(ann_file), "is not a COCO annotation object", "expected {images, annotations, categories}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise QatError(str(ann_file), f"has no list '{key}'", "a COCO instances file has images, annotations "
                           "and categories")
    if not coco["categories"]:
        raise QatError(str(ann_file), "lists no categories", "a detection set needs at least one category")
    try:
        categories = sorted(coco["categories"], key=lambda c: c["id"])
        files = {im["id"]: im["file_name"] for im in coco["images"]}
        pairs = [(a["image_id"], a["category_id"], a["bbox"]) for a in coco["annotations"]]
        names = [str(c["name"]) for c in categories]
    except (KeyError, TypeError) as exc:
        raise QatError(str(ann_file), f"has an entry without the field {exc}", "check the file's format") from exc
    category_ids = [int(c["id"]) for c in categories]
    known = set(category_ids)
    for image_id, category_id, bbox in pairs:
        if image_id not in files:
            raise QatError(str(ann_file), f"an annotation refers to image id {image_id}, which is not listed",
                           "every annotation's image_id must appear in 'images'")
        if category_id not in known:
            raise QatError(str(ann_file), f"an annotation refers to category id {category_id}, which is not listed",
                           "every annotation's category_id must appear in 'categories'")
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise QatError(str(ann_file), f"an annotation of image {image_id} has bbox {bbox!r}",
                           "bbox is [x, y, width, height]")
    annotated = {image_id for image_id, _, _ in pairs}
    missing = sorted(str(images_dir / files[i]) for i in annotated if not (images_dir / files[i]).is_file())
    if missing:
        raise QatError(missing[0], f"is missing ({len(missing)} annotated image(s) missing under {images_dir})",
                       f"restore the images or remove their annotations from {ann_file}")
    return CocoSplit(images_dir, ann_file, category_ids, names, coco if keep_annotations else {})


def detection_transforms(resolution: int, train: bool, hflip: float = 0.5) -> v2.Compose:
    """Resize to the model's square input (boxes follow), random horizontal flip when training."""
    steps: list[Any] = [v2.ToImage()]
    if train and hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += [v2.Resize((resolution, resolution), antialias=True), v2.ToDtype(torch.float32, scale=True)]
    if train:
        steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(steps)


class CocoDetectionSet(Dataset):
    """torchvision ``CocoDetection`` (transforms v2 wrapper) yielding ``(image, target)`` for SSD.

    ``target``: ``boxes`` (XYXY, in the resized image), ``labels`` (1..C), ``image_id``, ``orig_size`` (h, w).
    Crowd annotations are dropped from training targets (COCOeval ignores them when scoring).
    """

    def __init__(self, split: CocoSplit, transforms: v2.Compose, limit: int | None = None) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            base = CocoDetection(str(split.images_dir), str(split.annotation_file))
        if limit is not None:
            base.ids = base.ids[:limit]
        self.base = wrap_dataset_for_transforms_v2(base, target_keys=("image_id", "boxes", "labels", "iscrowd"))
        self.ids = list(base.ids)
        self.transforms = transforms
        self.label_of = {cid: i + 1 for i, cid in enumerate(split.category_ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.base[index]
        height, width = image.height, image.width
        if "boxes" in target:
            keep = torch.tensor([not c for c in target["iscrowd"]], dtype=torch.bool)
            boxes = tv_tensors.wrap(target["boxes"][keep], like=target["boxes"])  # indexing drops the type
            labels = torch.tensor([self.label_of[int(c)] for c in target["labels"][keep]], dtype=torch.int64)
        else:  # an image without annotations: a background-only target
            boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
            labels = torch.zeros(0, dtype=torch.int64)
        image, out = self.transforms(image, {"boxes": boxes, "labels": labels})
        out = {"boxes": out["boxes"].as_subclass(torch.Tensor).float(), "labels": out["labels"],
               "image_id": int(target["image_id"]), "orig_size": (height, width)}
        return image, out


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def detection_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0,
                     seed: int = 0, distributed: bool = False) -> DataLoader:
    """Batches of (images, targets) lists. ``shuffle`` draws with a generator seeded by ``seed``; under DDP
    (``distributed``) each rank draws its shard of one ``seed``-ed permutation instead (``DistributedSampler``;
    the training engine calls ``set_epoch``)."""
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                          drop_last=False)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate,
                      generator=generator, drop_last=False)
