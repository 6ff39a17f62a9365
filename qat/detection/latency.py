"""What the latency subprocess (:mod:`qat.latency.subprocess`, ``task="detection"``) times for a detector: the
whole detector (resize/normalise, the core on the engine, anchors, box decoding and per-class NMS in float, as
TFLite's detection post-process op runs in float) and its core alone (backbone and heads)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from qat.detection.detector import SSDLiteDetector
from qat.detection.models import build_detector


def build_for_latency(spec: Any) -> tuple[Callable[[torch.Tensor], Any], torch.Tensor,
                                          Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(detector, a batch of images in [0, 1], core engine, the core's input) for a
    :class:`~qat.latency.subprocess.MeasureSpec`: ``arch`` is the backbone, ``num_classes`` the number of object
    categories, ``weights`` the float detector's state dict (its scores decide how many boxes reach NMS)."""
    from qat.engines.registry import build_float, build_int
    from qat.intmodel.graph import IntModel

    resolution = int(spec.resolution)
    float_run = spec.precision == "float"
    detector = build_detector(spec.arch, num_categories=spec.num_classes, width_mult=spec.width_mult,
                              resolution=resolution, weights=spec.weights if float_run else None).eval()
    images = torch.rand(spec.batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(spec.seed))
    with torch.no_grad():
        core_input = detector.shell.transform(list(images))[0].tensors
    if float_run:
        core = build_float(spec.engine, detector.core, core_input, spec.threads)
    else:
        int_model = IntModel.load(spec.int_model)
        if list(int_model.input_shape) != list(core_input.shape):  # engines compiled for one shape
            int_model = dataclasses.replace(int_model, input_shape=list(core_input.shape))
        core = build_int(spec.engine, int_model, spec.threads)
    whole = SSDLiteDetector(core, detector.shell, detector.level_shapes, detector.anchors_per_location,
                            detector.num_classes).eval()

    def run(batch: torch.Tensor) -> Any:
        with torch.no_grad():
            return whole(list(batch))

    return run, images, core, core_input


__all__ = ["build_for_latency"]
