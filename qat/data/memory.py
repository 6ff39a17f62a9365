"""Decode-once classification data (``data.in_memory``): the images of a split that fits in memory are decoded a
single time and held as uint8 tensors; augmentation and normalisation run per batch on those tensors.

Training batches (:class:`RandomResizedCropFlip`) draw the same distribution as the streamed pipeline's
``RandomResizedCrop(scale, ratio 3/4-4/3) + RandomHorizontalFlip(p) + ToTensor + Normalize``: crop boxes follow
torchvision's ``get_params`` (ten tries, then the centre-crop fallback), and the crop is resized with PIL's
antialiased bilinear filter (the same triangle weights, horizontal pass then vertical, each rounded to 8 bits
as PIL does) written as two batched matrix products, so a pixel differs from PIL's by at most one level. The
random numbers come from the global torch generator of the process that collates (the main process with
``data.workers=0``), like the streamed transforms', so a run's batches depend only on its seeds and a resumed
epoch that re-draws its consumed batches continues exactly.

Evaluation images (:class:`Normalize`) are resized and centre-cropped once, by the streamed pipeline's own PIL
transforms, and stored at the model's resolution; a batch is those uint8 pixels through ToTensor's and
Normalize's arithmetic, so every validation tensor is bit-identical (``torch.equal``) to the streamed one.

Decoding is lazy (the first batch drawn, or at build time when DataLoader workers will fork) and shared
through a small per-process cache, so a second loader over the same folder, or a validation-only use of
:func:`~qat.data.imagefolder.build_classification_loaders`, decodes nothing twice or needlessly.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from qat.errors import QatError

log = logging.getLogger("qat")

IN_MEMORY_CHOICES = ("auto", "true", "false")
IN_MEMORY_MAX_MB = 1024
"""``data.in_memory=auto`` holds a split in memory when its stored pixels (decoded training images; validation
images at the model's resolution) are estimated under this many MiB; larger splits (ImageNet) stream from disk."""
DECODE_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
HEADER_SAMPLE = 64  # image headers read to estimate a training split's decoded size
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range


def in_memory_mode(value: str | bool) -> str:
    """``data.in_memory`` as one of :data:`IN_MEMORY_CHOICES` (YAML and command-line booleans accepted)."""
    mode = str(value).strip().lower()
    if mode not in IN_MEMORY_CHOICES:
        raise QatError("data.in_memory", f"{value!r} is not one of {', '.join(IN_MEMORY_CHOICES)}",
                       f"auto holds splits under {IN_MEMORY_MAX_MB} MiB in memory; false streams from disk")
    return mode


def estimated_bytes(samples: Sequence[tuple[str, int]], resolution: int | None = None) -> int:
    """Bytes of a split's stored uint8 pixels: ``3 * resolution**2`` per image when given (precomputed evaluation
    crops), else the decoded RGB size estimated from up to :data:`HEADER_SAMPLE` evenly spaced image headers."""
    if resolution is not None:
        return len(samples) * 3 * resolution * resolution
    step = max(1, len(samples) // HEADER_SAMPLE)
    pixels = []
    for path, _ in samples[::step][:HEADER_SAMPLE]:
        try:
            with Image.open(path) as image:  # reads the header only
                pixels.append(image.size[0] * image.size[1])
        except (OSError, SyntaxError, ValueError):
            continue  # decoding names the file (UnreadableImage) when it gets there
    return int(3 * len(samples) * (sum(pixels) / len(pixels))) if pixels else 0


def to_uint8_chw(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a contiguous uint8 (3, H, W) tensor: ToTensor's layout before its division."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


# --- the decode-once dataset ------------------------------------------------------------------------------------

_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]] = {}
_CACHE_LOCK = threading.Lock()


def _signature(samples: Sequence[tuple[str, int]]) -> tuple[Any, ...]:
    """The files of a split as found now (path, class, size, modification time): a rewritten file is re-decoded."""
    stats = [os.stat(path) for path, _ in samples]
    return tuple((path, target, st.st_size, st.st_mtime_ns) for (path, target), st in zip(samples, stats, strict=True))


def clear_cache() -> None:
    """Forget every decoded split of this process."""
    with _CACHE_LOCK:
        _CACHE.clear()


class InMemoryImages(Dataset):
    """The images of an :class:`~torchvision.datasets.ImageFolder` split decoded once into uint8 (3, H, W)
    tensors, each passed through ``geometry`` (a deterministic PIL transform: the evaluation resize and centre
    crop) when given. Items are ``(uint8 image, class index)``; the loader's ``collate_fn`` (``batch_transform``:
    :class:`RandomResizedCropFlip` or :class:`Normalize`) turns a list of them into a float batch. Keeps the
    folder's ``root``, ``samples``, ``targets``, ``classes`` and ``class_to_idx``."""

    def __init__(self, folder: ImageFolder, batch_transform: Callable[[Any], tuple[torch.Tensor, torch.Tensor]],
                 *, geometry: Callable[[Image.Image], Image.Image] | None = None, key: tuple[Any, ...] = ()
                 ) -> None:
        self.root, self.samples, self.targets = folder.root, list(folder.samples), list(folder.targets)
        self.classes, self.class_to_idx = folder.classes, folder.class_to_idx
        self.loader = folder.loader
        self.batch_transform = batch_transform
        self.geometry = geometry
        self.key = key  # what else the stored pixels depend on (the evaluation resolution and resize ratio)
        self._images: torch.Tensor | list[torch.Tensor] | None = None
        self._labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def decoded(self) -> bool:
        return self._images is not None

    def materialize(self) -> InMemoryImages:
        """Decode every image now (or take them from this process's cache); later calls do nothing."""
        if self._images is not None:
            return self
        with _CACHE_LOCK:
            key = (self.root, self.key, _signature(self.samples))
            if key not in _CACHE:
                for other in [k for k in _CACHE if k[0] == self.root and k[1] == self.key]:
                    del _CACHE[other]  # a stale decode of the same split
                if len(_CACHE) >= 4:  # keep the newest few splits
                    del _CACHE[next(iter(_CACHE))]
                _CACHE[key] = self._decode()
            self._images, self._labels = _CACHE[key]
        return self

    def _decode(self) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        start = time.perf_counter()

        def decode(path: str) -> torch.Tensor:
            image = self.loader(path)  # read_image: an unreadable file stops the run with its path
            return to_uint8_chw(self.geometry(image) if self.geometry is not None else image)

        # PIL decodes with the GIL released: a few threads decode in parallel, in order (the first unreadable
        # file in the split's order is the one reported)
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            images = list(pool.map(decode, [path for path, _ in self.samples], chunksize=64))
        shapes = {tuple(image.shape) for image in images}
        stored: torch.Tensor | list[torch.Tensor] = torch.stack(images) if len(shapes) == 1 else images
        size = sum(image.numel() for image in images)
        log.info("[data] %d images of %s decoded into memory (%.1f MiB, %.1f s)", len(images), self.root,
                 size / 2**20, time.perf_counter() - start)
        return stored, torch.tensor(self.targets, dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.materialize()
        assert self._images is not None
        return self._images[index], self.targets[index]

    def __getitems__(self, indices: Sequence[int]) -> Sequence[tuple[torch.Tensor, int]]:
        """A batch's items in one go (DataLoader's batched fetch)."""
        self.materialize()
        assert self._images is not None and self._labels is not None
        if isinstance(self._images, torch.Tensor):
            index = torch.as_tensor(indices, dtype=torch.int64)
            with one_thread():
                return _Batch(self._images[index], self._labels[index])
        return [(self._images[i], self.targets[i]) for i in indices]


class _Batch(Sequence[tuple[torch.Tensor, int]]):
    """A batch gathered by :meth:`InMemoryImages.__getitems__`: the stacked uint8 images and their labels, read
    by the collate functions here as they are, and a sequence of ``(image, label)`` items for any other."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.images[index], int(self.labels[index])


Stacked = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _stack(samples: Sequence[tuple[torch.Tensor, int]]) -> Stacked:
    """(uint8 images (B, 3, H, W) zero-padded to the largest, labels, heights, widths)."""
    if isinstance(samples, _Batch):
        images, labels = samples.images, samples.labels
        batch, _, height, width = images.shape
        return images, labels, torch.full((batch,), height), torch.full((batch,), width)
    heights = torch.tensor([image.shape[1] for image, _ in samples])
    widths = torch.tensor([image.shape[2] for image, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    if bool((heights == heights[0]).all() and (widths == widths[0]).all()):
        return torch.stack([image for image, _ in samples]), labels, heights, widths
    images = torch.zeros(len(samples), 3, int(heights.max()), int(widths.max()), dtype=torch.uint8)
    for out, (image, _) in zip(images, samples, strict=True):
        out[:, : image.shape[1], : image.shape[2]] = image
    return images, labels, heights, widths


def normalize_(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """ToTensor's ``/ 255`` then Normalize's ``(x - mean) / std`` on a float batch of 0-255 values, in place, with
    the same float32 operations (so the result equals the per-image transforms' bit for bit)."""
    pixels.div_(255)
    pixels.sub_(torch.as_tensor(mean, dtype=pixels.dtype).view(1, -1, 1, 1))
    return pixels.div_(torch.as_tensor(std, dtype=pixels.dtype).view(1, -1, 1, 1))


class Normalize:
    """Evaluation collate: stored uint8 crops -> the normalised float batch, and the labels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        with one_thread():
            images, labels, _, _ = _stack(samples)
            return normalize_(images.float(), self.mean, self.std), labels


# --- batched random-resized crop --------------------------------------------------------------------------------


def random_resized_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: Sequence[float],
                              ratio: Sequence[float] = RATIO, tries: int = 10) -> torch.Tensor:
    """(B, 4) crop boxes ``(top, left, height, width)`` drawn as torchvision's ``RandomResizedCrop.get_params``
    draws them, for a batch at once: ``tries`` (area fraction, log aspect) proposals per image, the first that
    fits is taken and placed uniformly; none fitting falls back to the largest centred crop within ``ratio``."""
    batch = heights.shape[0]
    h_in, w_in = heights.double()[:, None], widths.double()[:, None]
    area = h_in * w_in
    fraction = torch.empty(batch, tries, dtype=torch.float64).uniform_(scale[0], scale[1])
    log_ratio = torch.empty(batch, tries, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = torch.round(torch.sqrt(area * fraction * aspect))
    h = torch.round(torch.sqrt(area * fraction / aspect))
    fits = (w > 0) & (w <= w_in) & (h > 0) & (h <= h_in)
    first = torch.where(fits.any(1), fits.int().argmax(1), 0)
    w, h = w.gather(1, first[:, None])[:, 0], h.gather(1, first[:, None])[:, 0]
    # the fallback: the whole image, trimmed to the nearest allowed aspect ratio
    h_all, w_all = heights.double(), widths.double()
    in_ratio = w_all / h_all
    fb_w = torch.where(in_ratio > ratio[1], torch.round(h_all * ratio[1]), w_all)
    fb_h = torch.where(in_ratio < ratio[0], torch.round(w_all / ratio[0]), h_all)
    found = fits.any(1)
    h, w = torch.where(found, h, fb_h), torch.where(found, w, fb_w)
    u = torch.rand(batch, 2, dtype=torch.float64)
    top = torch.minimum(torch.floor(u[:, 0] * (h_all - h + 1)), h_all - h)
    left = torch.minimum(torch.floor(u[:, 1] * (w_all - w + 1)), w_all - w)
    top = torch.where(found, top, torch.div(h_all - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(w_all - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], 1).long()


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(B, out_size, in_size) weights resampling pixels ``[start, start + length)`` of each image's row (or column)
    to ``out_size`` pixels as PIL's antialiased bilinear resize does (``precompute_coeffs``: a triangle filter
    widened by the downscale factor, centred on each output pixel, normalised; zero outside the crop)."""
    scale = (length.float() / out_size)[:, None, None]
    inverse_width = 1.0 / scale.clamp(min=1.0)
    center = (torch.arange(out_size, dtype=torch.float32)[None, :, None] + 0.5) * scale
    x = torch.arange(in_size, dtype=torch.float32)[None, None, :] - start.float()[:, None, None]  # crop-relative
    inside = (x >= 0) & (x < length.float()[:, None, None])
    weights = (x + 0.5).sub(center).abs_().mul_(inverse_width).neg_().add_(1.0).clamp_(min=0.0).mul_(inside)
    return weights.div_(weights.sum(-1, keepdim=True))


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """uint8 (B, 3, H, W) images -> float (B, 3, size, size) of their ``boxes`` (top, left, height, width) resized
    as PIL resizes (horizontal pass, round to 8 bits, vertical pass, round), mirrored where ``flip``. The weights
    are non-negative and sum to one, so every value stays within 0-255 without clipping."""
    batch, channels, height, width = images.shape
    across = resize_weights(boxes[:, 1], boxes[:, 3], width, size)  # (B, size, W)
    down = resize_weights(boxes[:, 0], boxes[:, 2], height, size)  # (B, size, H)
    if flip is not None:
        across = torch.where(flip[:, None, None], across.flip(1), across)
    rows = torch.bmm(images.float().view(batch, channels * height, width), across.transpose(1, 2))
    rows = rows.add_(0.5).floor_().view(batch * channels, height, size)  # (B * 3, H, size)
    down = down.repeat_interleave(channels, 0)  # (B * 3, size, H)
    return torch.bmm(down, rows).add_(0.5).floor_().view(batch, channels, size, size)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops on one thread (as DataLoader workers do): a batch's augmentation is a few small operations,
    which intra-op threads slow down, most of all while the training step's threads hold the cores."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RandomResizedCropFlip:
    """Training collate: uint8 images -> the normalised float batch of random-resized crops (``scale``, ``ratio``)
    to ``size`` x ``size``, each mirrored with probability ``hflip`` (0: no flip draw at all), and the labels."""

    def __init__(self, size: int, *, scale: Sequence[float], hflip: float, mean: Sequence[float],
                 std: Sequence[float], ratio: Sequence[float] = RATIO) -> None:
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        with one_thread():
            images, labels, heights, widths = _stack(samples)
            boxes = random_resized_crop_boxes(heights, widths, self.scale, self.ratio)
            flip = torch.rand(len(labels)) < self.hflip if self.hflip > 0 else None
            return normalize_(resized_crops(images, boxes, self.size, flip), self.mean, self.std), labels

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip})")


__all__ = [
    "IN_MEMORY_CHOICES",
    "IN_MEMORY_MAX_MB",
    "InMemoryImages",
    "Normalize",
    "RandomResizedCropFlip",
    "clear_cache",
    "estimated_bytes",
    "in_memory_mode",
    "normalize_",
    "one_thread",
    "random_resized_crop_boxes",
    "resize_weights",
    "resized_crops",
]
