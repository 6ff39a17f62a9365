"""ImageFolder loaders with standard ImageNet preprocessing (same code path for ImageNet and the demo set).

Expected layout: ``<root>/train/<class>/*.jpg|png`` and ``<root>/val/<class>/*.jpg|png`` with the same
class folders in both splits. The layout is checked before any loading work; problems raise
:class:`~qat.errors.QatError` with key ``data.root``.

Decode once (``data.in_memory``, :mod:`qat.data.memory`): a split that fits in memory (``auto``: under
:data:`~qat.data.memory.IN_MEMORY_MAX_MB` MiB; the demo set) is decoded a single time into uint8 tensors and
augmented per batch, with the same crop and flip distribution; evaluation crops are precomputed and equal the
streamed ones bit for bit. ``false`` (and any split above the bound, e.g. ImageNet) streams from disk with
the per-image PIL transforms of :func:`classification_transforms`.

Unreadable images: the run stops at the first file that cannot be decoded, with one line naming it
(:class:`UnreadableImage`); nothing is skipped silently, so every record's accuracy is over the whole split.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from qat.data.memory import (
    IN_MEMORY_MAX_MB,
    InMemoryImages,
    Normalize,
    RandomResizedCropFlip,
    estimated_bytes,
    in_memory_mode,
)
from qat.data.subset import restrict_folder
from qat.errors import QatError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
log = logging.getLogger("qat")
LAYOUT = "expected <root>/train/<class>/*.jpg|png and <root>/val/<class>/*.jpg|png with the same classes"


_UNREADABLE = ": cannot be read as an image"


class UnreadableImage(QatError):
    """An image file that cannot be decoded. Policy: stop with its path (fix the file, re-run: the run resumes
    from its last checkpoint), never skip it."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        if reason is None and _UNREADABLE in path:  # rebuilt from its message by a DataLoader worker's re-raise
            line = next(ln for ln in reversed(path.splitlines()) if _UNREADABLE in ln)
            path, _, rest = line.partition(_UNREADABLE)
            path, reason = path.split("UnreadableImage: ", 1)[-1], rest.strip(" ()").split(") (")[0]
        super().__init__(path, f"cannot be read as an image ({reason})", "replace or delete the file")


def read_image(path: str) -> Image.Image:
    """Open ``path`` as RGB (torchvision's loader), or raise :class:`UnreadableImage` naming it."""
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(path, f"{type(exc).__name__}: {exc}") from exc


@dataclass
class ClassificationData:
    """What :func:`build_classification_loaders` returns; unpacks as ``train, val, class_names``. ``val_subset``
    describes the validation subset (:func:`qat.data.subset.restrict_folder`), ``None`` for the whole split."""

    train: DataLoader
    val: DataLoader
    class_names: list[str]
    val_subset: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.train, self.val, self.class_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _has_image(folder: Path) -> bool:
    """True as soon as one file with an image extension is found under ``folder`` (recursively)."""
    for _dirpath, _dirnames, filenames in os.walk(folder, followlinks=True):
        if any(name.lower().endswith(IMG_EXTENSIONS) for name in filenames):
            return True
    return False


def _split_classes(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise QatError("data.root", f"{folder} is missing", LAYOUT)
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise QatError("data.root", f"{folder} has no class folders", LAYOUT)
    for name in classes:
        if not _has_image(folder / name):
            raise QatError("data.root", f"class folder {folder / name} has no images", LAYOUT)
    return classes


def check_layout(root: str | os.PathLike[str]) -> list[str]:
    """Check the ImageFolder layout under ``root`` without loading anything; return the class names."""
    path = Path(root).expanduser()
    if not path.is_dir():
        raise QatError("data.root", f"{path} does not exist or is not a directory", LAYOUT)
    train, val = _split_classes(path, "train"), _split_classes(path, "val")
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise QatError(
            "data.root",
            f"class folders differ between {path / 'train'} and {path / 'val'} "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})",
            LAYOUT,
        )
    return train


def classification_transforms(
    resolution: int, *, train_crop_scale: tuple[float, float] = (0.08, 1.0), resize_ratio: float = 0.875,
    hflip: float = 0.5,
) -> tuple[transforms.Compose, transforms.Compose]:
    """ImageNet-style (train, val) transforms: random-resized crop (``data.train_crop_scale``) + horizontal flip
    with probability ``hflip`` (``data.hflip``; 0: no flip step at all); resize + centre crop."""
    if not 0.0 <= hflip <= 1.0:
        raise QatError("data.hflip", f"{hflip} is not a probability in [0, 1]",
                       "0.5 flips half the training images (ImageNet); 0 never (digits, text)")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    flip = [transforms.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    train = transforms.Compose([
        transforms.RandomResizedCrop(resolution, scale=train_crop_scale),
        *flip,
        transforms.ToTensor(),
        normalize,
    ])  # fmt: skip
    val = transforms.Compose([
        transforms.Resize(round(resolution / resize_ratio)),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        normalize,
    ])  # fmt: skip
    return train, val


def _hold(mode: str, samples: list[tuple[str, int]], resolution: int | None, split: str) -> bool:
    """Whether a split is held in memory under ``data.in_memory`` mode ``mode`` (see build_classification_loaders)."""
    if mode != "auto":
        return mode == "true"
    size = estimated_bytes(samples, resolution)
    if size > IN_MEMORY_MAX_MB * 2**20:
        log.info("[data] %s: about %.0f MiB of pixels, over data.in_memory's %d MiB: streaming from disk", split,
                 size / 2**20, IN_MEMORY_MAX_MB)
        return False
    return True


def build_classification_loaders(
    root: str | os.PathLike[str],
    *,
    resolution: int,
    batch_size: int,
    workers: int = 0,
    train_crop_scale: tuple[float, float] = (0.08, 1.0),
    resize_ratio: float = 0.875,
    hflip: float = 0.5,
    seed: int = 0,
    distributed: bool = False,
    in_memory: str | bool = "auto",
    val_max_images: int | None = None,
    val_subset_seed: int = 0,
) -> ClassificationData:
    """Train and val loaders over ``<root>/{train,val}/<class>/*``; training images are augmented by
    :func:`classification_transforms` (random-resized crop, horizontal flip with probability ``hflip``).

    The train loader shuffles with a generator seeded by ``seed`` (or a seeded ``DistributedSampler`` when
    ``distributed``; call ``sampler.set_epoch`` each epoch) and drops the last partial batch when there is
    at least one full batch (a batch of one breaks batch norm). Val is in order and never drops samples,
    except that ``DistributedSampler`` pads it to a multiple of the world size.

    ``in_memory`` (``data.in_memory``): ``auto`` holds each split whose stored pixels are estimated under
    :data:`~qat.data.memory.IN_MEMORY_MAX_MB` MiB in memory (:class:`~qat.data.memory.InMemoryImages`, decoded on
    first use; the loader's ``collate_fn`` augments or normalises each batch), ``true`` holds both whatever
    their size, ``false`` streams both from disk with the per-image transforms.

    ``val_max_images`` (``data.val_max_images``) keeps a class-stratified subset of the validation split drawn with
    ``val_subset_seed`` (:mod:`qat.data.subset`); only those images are decoded.
    """
    if resolution < 1 or batch_size < 1:
        raise QatError("data", f"resolution {resolution} and batch size {batch_size} must be positive")
    if not 0.0 < resize_ratio <= 1.0:
        raise QatError("data.resize_ratio", f"{resize_ratio} is not in (0, 1]", "ImageNet uses 0.875")
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise QatError(
            "data.distributed", "torch.distributed is not initialised", "call init_process_group first"
        )
    mode = in_memory_mode(in_memory)
    classes = check_layout(root)
    root = Path(root).expanduser()
    train_tf, val_tf = classification_transforms(
        resolution, train_crop_scale=train_crop_scale, resize_ratio=resize_ratio, hflip=hflip
    )
    train_set = ImageFolder(str(root / "train"), transform=train_tf, loader=read_image)
    val_set = ImageFolder(str(root / "val"), transform=val_tf, loader=read_image)
    val_subset = restrict_folder(val_set, val_max_images, val_subset_seed)
    train_collate = val_collate = None
    if _hold(mode, train_set.samples, None, "train"):
        train_collate = RandomResizedCropFlip(resolution, scale=train_crop_scale, hflip=hflip,
                                              mean=IMAGENET_MEAN, std=IMAGENET_STD)
        train_set = InMemoryImages(train_set, train_collate, key=("decoded",))
    if _hold(mode, val_set.samples, resolution, "val"):
        val_collate = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        geometry = transforms.Compose(val_tf.transforms[:-2])  # resize + centre crop, before ToTensor/Normalize
        val_set = InMemoryImages(val_set, val_collate, geometry=geometry, key=("eval", resolution, resize_ratio))
    if workers > 0:  # decode before the workers fork, so that they share one copy
        for dataset in (train_set, val_set):
            if isinstance(dataset, InMemoryImages):
                dataset.materialize()
    if distributed:
        train_sampler = DistributedSampler(train_set, shuffle=True, seed=seed, drop_last=False)
        val_sampler = DistributedSampler(val_set, shuffle=False)
        per_replica = len(train_sampler)
        generator = None
    else:
        train_sampler = val_sampler = None
        per_replica = len(train_set)
        generator = torch.Generator().manual_seed(seed)
    common = {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    train = DataLoader(
        train_set, batch_size=batch_size, shuffle=train_sampler is None, sampler=train_sampler,
        generator=generator, drop_last=per_replica >= batch_size, collate_fn=train_collate, **common,
    )  # fmt: skip
    val = DataLoader(val_set, batch_size=batch_size, shuffle=False, sampler=val_sampler, collate_fn=val_collate,
                     **common)
    return ClassificationData(train, val, classes, val_subset)
