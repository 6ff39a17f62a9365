"""Calibration images for post-training quantization: the training split seen through the evaluation transform.

Range calibration (whitepaper §3.1), AdaQuant (Hubara et al. 2020 §3), BN re-estimation and bias correction
(Hubara §4.2-4.3) all estimate statistics the model will meet at test time, so the images are resized and
centre-cropped as for evaluation (no random crops or flips); they come from ``train/`` so the validation
images stay unseen. Shuffled with the run's seed: the same seed gives the same calibration set.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from qat.data.imagefolder import check_layout, classification_transforms, read_image
from qat.errors import QatError


def calibration_loader(root: str | os.PathLike[str], *, resolution: int, batch_size: int, seed: int,
                       resize_ratio: float = 0.875, workers: int = 0) -> DataLoader:
    """Shuffled loader over ``<root>/train`` with the evaluation transform (resize, centre crop, normalize)."""
    check_layout(root)
    if batch_size < 1:
        raise QatError("data.batch_size", f"{batch_size} is not positive", "use a batch size >= 1")
    _, val_tf = classification_transforms(resolution, resize_ratio=resize_ratio)
    images = ImageFolder(str(Path(root) / "train"), transform=val_tf, loader=read_image)
    return DataLoader(images, batch_size=batch_size, shuffle=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


__all__ = ["calibration_loader"]
