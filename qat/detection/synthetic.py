"""A built-in, seeded COCO-format detection dataset: coloured shapes with boxes and categories.

Real files in the COCO 2017 layout, read by the same loader as COCO itself::

    <root>/coco-synth-<hash>/train2017/000000000001.jpg ...
    <root>/coco-synth-<hash>/val2017/...
    <root>/coco-synth-<hash>/annotations/instances_{train,val}2017.json
    <root>/coco-synth-<hash>/manifest.json      (written last)

Each image holds 1..``max_objects`` non-overlapping shapes; the category is the shape, everything else
(colour, size, aspect, position, background) is drawn independently of it. Object sizes span COCO's
small/medium/large area ranges (32², 96² pixels) when the images are large enough. Category ids have gaps,
as COCO's do (80 categories with ids 1..90). Boxes are the tight boxes of the rendered (anti-aliased)
shapes; ``area`` is the shape's pixel coverage, as COCO's is the mask area. Same parameters give
byte-identical files; the dataset is written to a temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qat.data.synthetic import default_cache_dir
from qat.errors import QatError

GENERATOR = "qat.coco_synth"
GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train2017", "val2017")
# the one place the synthetic set's default size lives (functions, CLI and qat.detection.config read it)
SYNTH_DEFAULTS = {"train_images": 800, "val_images": 100, "image_size": 128, "num_categories": 5,
                  "max_objects": 3, "seed": 0}
SHAPES: tuple[str, ...] = ("disk", "square", "triangle", "cross", "ring", "diamond", "star", "frame")
CATEGORY_IDS: tuple[int, ...] = (1, 2, 4, 5, 7, 9, 10, 13)  # gaps, like COCO's ids
_SUPERSAMPLE = 4
_SIZE_RANGE = (0.14, 0.8)  # object box side / image side, log-uniform


def synth_params(**overrides: int) -> dict[str, int]:
    """The parameters that define a synthetic set (defaults from ``SYNTH_DEFAULTS``), checked."""
    unknown = set(overrides) - set(SYNTH_DEFAULTS)
    if unknown:
        raise QatError(f"data.synthetic.{sorted(unknown)[0]}", "is not a parameter of the synthetic set",
                       "valid keys: " + ", ".join(SYNTH_DEFAULTS))
    params = {**SYNTH_DEFAULTS, **{k: int(v) for k, v in overrides.items()}}
    if not 1 <= params["num_categories"] <= len(SHAPES):
        raise QatError("data.synthetic.num_categories", f"{params['num_categories']} is out of range",
                       f"use 1..{len(SHAPES)}")
    for key in ("train_images", "val_images", "max_objects"):
        if params[key] < 1:
            raise QatError(f"data.synthetic.{key}", f"{params[key]} is not positive", "use at least 1")
    if params["image_size"] < 32:
        raise QatError("data.synthetic.image_size", f"{params['image_size']} is too small", "use at least 32")
    return params


def synth_dir_name(params: dict[str, int]) -> str:
    blob = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True).encode()
    return "coco-synth-" + hashlib.sha256(blob).hexdigest()[:10]


def _is_complete(path: Path, params: dict[str, int]) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (manifest.get("generator"), manifest.get("version"), manifest.get("params")) == (
        GENERATOR, GENERATOR_VERSION, params)


def make_synthetic_coco(root: str | os.PathLike[str] | None = None, **params: int) -> Path:
    """Generate the synthetic set under ``root`` (default ``<cache>/data``) unless present; return its path."""
    params = synth_params(**params)
    parent = Path(root).expanduser() if root is not None else default_cache_dir() / "data"
    target = parent / synth_dir_name(params)
    if _is_complete(target, params):
        return target
    if target.exists():
        raise QatError("data.root", f"{target} exists but is not a complete synthetic set (no matching "
                       f"{MANIFEST_NAME})", "move or delete it")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        _write(tmp, params)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target, params):  # lost a race against another writer: use theirs if complete
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write(out: Path, params: dict[str, int]) -> None:
    categories = [{"id": CATEGORY_IDS[i], "name": SHAPES[i], "supercategory": "shape"}
                  for i in range(params["num_categories"])]
    counts = {"train2017": params["train_images"], "val2017": params["val_images"]}
    (out / "annotations").mkdir()
    for split_index, split in enumerate(SPLITS):
        (out / split).mkdir()
        images, annotations = [], []
        for i in range(counts[split]):
            image_id = i + 1
            rng = np.random.default_rng([params["seed"], split_index, i])
            pixels, objects = render_image(params["image_size"], params["num_categories"], params["max_objects"],
                                           rng)
            name = f"{image_id:012d}.jpg"
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=92)
            (out / split / name).write_bytes(buffer.getvalue())
            size = params["image_size"]
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            for category, bbox, area in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": CATEGORY_IDS[category], "bbox": bbox, "area": area,
                                    "iscrowd": 0})
        coco = {"info": {"description": "qat synthetic shapes (COCO format)", "version": str(GENERATOR_VERSION)},
                "licenses": [], "images": images, "annotations": annotations, "categories": categories}
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    manifest: dict[str, Any] = {"generator": GENERATOR, "version": GENERATOR_VERSION, "params": params}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def render_image(size: int, num_categories: int, max_objects: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, list[tuple[int, list[float], float]]]:
    """One image (H, W, 3) uint8 and its objects as (category index, [x, y, w, h], area)."""
    img = _background(size, rng)
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(30):
            side = size * float(np.exp(rng.uniform(*np.log(_SIZE_RANGE))))
            aspect = float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
            w, h = max(6, int(side * np.sqrt(aspect))), max(6, int(side / np.sqrt(aspect)))
            if w >= size or h >= size:
                continue
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            box = (x0, y0, x0 + w, y0 + h)
            if all(box[2] + 2 <= p[0] or p[2] + 2 <= box[0] or box[3] + 2 <= p[1] or p[3] + 2 <= box[1]
                   for p in placed):
                break
        else:
            continue
        category = int(rng.integers(0, num_categories))
        alpha = _coverage(SHAPES[category], w, h, rng)
        colour = _object_colour(rng)
        region = img[y0:y0 + h, x0:x0 + w]
        region += alpha[..., None] * (colour - region)
        solid = np.argwhere(alpha >= 0.5)
        if solid.size == 0:
            continue
        (r0, c0), (r1, c1) = solid.min(0), solid.max(0)
        placed.append(box)
        objects.append((category, [float(x0 + c0), float(y0 + r0), float(c1 - c0 + 1), float(r1 - r0 + 1)],
                        float(alpha.sum())))
    noise = rng.normal(0.0, rng.uniform(2.0, 8.0), img.shape).astype(np.float32)
    return np.clip(img + noise, 0, 255).round().astype(np.uint8), objects


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(0, 110, 3).astype(np.float32)
    slope = rng.uniform(-40, 40, (2, 3)).astype(np.float32)
    t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    return base + t[:, None, None] * slope[0] + t[None, :, None] * slope[1] + np.zeros((size, size, 3), np.float32)


def _object_colour(rng: np.random.Generator) -> np.ndarray:
    colour = rng.uniform(60, 255, 3)
    colour[int(rng.integers(0, 3))] = rng.uniform(200, 255)  # at least one bright channel: visible on the background
    return colour.astype(np.float32)


def _coverage(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` filling a w x h box (supersampled)."""
    k = _SUPERSAMPLE
    u = (np.arange(w * k, dtype=np.float32) + 0.5) / (w * k) * 2 - 1
    v = (np.arange(h * k, dtype=np.float32) + 0.5) / (h * k) * 2 - 1
    u, v = np.meshgrid(u, v)
    mask = shape_mask(shape, u, v, rng)
    return mask.reshape(h, k, w, k).mean(axis=(1, 3)).astype(np.float32)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of ``shape`` in box coordinates u, v in [-1, 1] (it touches all four box edges)."""
    au, av, r2 = np.abs(u), np.abs(v), u * u + v * v
    if shape == "disk":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= rng.uniform(0.35, 0.6) ** 2)
    if shape == "square":
        return np.ones_like(u, dtype=bool)
    if shape == "frame":
        inner = rng.uniform(0.4, 0.65)
        return (au >= inner) | (av >= inner)
    if shape == "triangle":
        return (v + 1) / 2 >= au  # apex at the top centre, base along the bottom edge
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        arm = rng.uniform(0.25, 0.4)
        return (au <= arm) | (av <= arm)
    if shape == "star":
        phi = (np.arctan2(v, u) + np.pi / 2) * 5 / (2 * np.pi)
        tri = 1.0 - 2.0 * np.abs(phi - np.floor(phi) - 0.5)
        return np.sqrt(r2) <= 0.45 + 0.55 * tri
    raise ValueError(f"unknown shape {shape!r}")


def main(argv: list[str] | None = None) -> int:
    """Generate the synthetic COCO-format set (if missing) and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="parent folder (default: $QAT_CACHE/data or ~/.cache/qat/data)")
    for key, value in SYNTH_DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    args = vars(parser.parse_args(argv))
    root = args.pop("root")
    try:
        print(make_synthetic_coco(root, **args))
    except QatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
