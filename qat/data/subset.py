"""A seeded, class-stratified subset of a validation split (``data.val_max_images``), for quick sweeps.

Every class keeps at least one image and the rest of the budget is shared in proportion to the classes' sizes
(largest remainders, ties to the lower class index), so a subset of ImageNet's balanced validation set holds
the same number of images per class. Which images of a class are kept is a seeded permutation of that class's
images: the same seed gives the same subset whatever the run's own seed, so runs of a sweep with different
training seeds are evaluated on the same images. The subset keeps the split's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qat.errors import QatError


def class_quotas(sizes: Sequence[int], count: int) -> list[int]:
    """Images per class: one each, then ``count - len(sizes)`` shared in proportion to ``sizes`` (largest
    remainder; a class never gets more images than it has)."""
    quotas = [min(1, n) for n in sizes]
    spare = [n - q for n, q in zip(sizes, quotas, strict=True)]
    left = count - sum(quotas)
    while left > 0 and sum(spare) > 0:
        total = sum(spare)
        shares = [left * s / total for s in spare]
        whole = [min(int(share), s) for share, s in zip(shares, spare, strict=True)]
        if sum(whole) == 0:  # fewer images left than classes with spare ones: largest remainders first
            order = sorted(range(len(spare)), key=lambda c: (-shares[c], c))
            whole = [0] * len(spare)
            for c in order[:left]:
                whole[c] = 1 if spare[c] > 0 else 0
        for c, extra in enumerate(whole):
            quotas[c] += extra
            spare[c] -= extra
            left -= extra
    return quotas


def stratified_indices(targets: Sequence[int], count: int, seed: int, key: str = "data.val_max_images"
                       ) -> list[int]:
    """Indices (ascending) of a class-stratified subset of ``count`` images of a split labelled ``targets``;
    every index when ``count`` covers the split. ``key`` names the setting in errors."""
    classes = sorted(set(targets))
    if count < len(classes):
        raise QatError(key, f"{count} images cannot cover the validation set's {len(classes)} classes",
                       f"use at least {len(classes)} (one per class), or null for the whole set")
    if count >= len(targets):
        return list(range(len(targets)))
    members: dict[int, list[int]] = {c: [] for c in classes}
    for index, label in enumerate(targets):
        members[label].append(index)
    quotas = class_quotas([len(members[c]) for c in classes], count)
    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for c, quota in zip(classes, quotas, strict=True):
        order = torch.randperm(len(members[c]), generator=generator)[:quota]
        chosen += [members[c][i] for i in order.tolist()]
    return sorted(chosen)


def restrict_folder(folder: Any, count: int | None, seed: int) -> dict[str, Any] | None:
    """Keep a stratified subset of an :class:`~torchvision.datasets.ImageFolder` split in place (``samples``,
    ``imgs``, ``targets``); returns the record's ``val_subset`` block, or ``None`` when the whole split stays."""
    if count is None:
        return None
    if count < 1:
        raise QatError("data.val_max_images", f"{count} is not a positive number of images",
                       "give a positive count, or null for the whole validation set")
    full = len(folder.samples)
    keep = stratified_indices(list(folder.targets), count, seed)
    if len(keep) == full:
        return None
    folder.samples = [folder.samples[i] for i in keep]
    folder.imgs = folder.samples
    folder.targets = [folder.targets[i] for i in keep]
    return {"images": len(keep), "of": full, "seed": seed, "stratified_by": "class"}


__all__ = ["class_quotas", "restrict_folder", "stratified_indices"]
