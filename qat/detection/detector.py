"""The detector split in two: a traceable, quantizable *core* and a float *shell* around it.

Core (backbone + SSDLite heads): image tensor -> one flat tensor holding every level's class logits, then
every level's box regressions, each flattened in (anchor, column, y, x) order. One output and only conv,
add, flatten and cat, so it goes through ``qat.quant.prepare`` and converts to today's integer model.

Shell (torchvision's ``SSD`` without backbone and head): resize/normalise, default boxes, SSD's matching and
loss, box decoding, per-class NMS, all in float, as TFLite's detection post-process op runs in float.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from qat.errors import QatError


class TappedBackbone(nn.Module):
    """Backbone stages whose outputs are feature levels, followed by SSDLite's extra layers."""

    def __init__(self, stages: list[nn.Module], extras: nn.ModuleList) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.extras = extras

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        for block in self.extras:
            x = block(x)
            features.append(x)
        return features


class DetectionCore(nn.Module):
    """Backbone and heads: ``(N, 3, H, W)`` -> ``(N, sum_l A_l·(K + 4)·H_l·W_l)`` (class logits, then boxes)."""

    def __init__(self, backbone: TappedBackbone, cls_heads: nn.ModuleList, reg_heads: nn.ModuleList) -> None:
        super().__init__()
        self.backbone = backbone
        self.cls_heads = cls_heads
        self.reg_heads = reg_heads

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        flat = [torch.flatten(head(f), 1) for head, f in zip(self.cls_heads, features, strict=True)]
        flat += [torch.flatten(head(f), 1) for head, f in zip(self.reg_heads, features, strict=True)]
        return torch.cat(flat, 1)


class SSDLiteDetector(nn.Module):
    """torchvision's SSD forward with the backbone and heads replaced by ``core`` (float, simulated or int8).

    Training mode: ``detector(images, targets)`` -> SSD losses (hard-negative mining, smooth L1; Liu et al.
    2016 eq. 1-2), each divided by ``num_foreground`` (eq. 1's N, also returned). Eval mode:
    ``detector(images)`` -> per image ``{"boxes", "scores", "labels"}`` in the input image's pixel coordinates.
    """

    def __init__(self, core: nn.Module, shell: SSD, level_shapes: list[tuple[int, int]],
                 anchors_per_location: list[int], num_classes: int) -> None:
        super().__init__()
        self.core = core
        self.shell = shell
        self.level_shapes = [tuple(int(v) for v in s) for s in level_shapes]
        self.anchors_per_location = list(anchors_per_location)
        self.num_classes = num_classes

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.shell.transform.fixed_size)  # type: ignore[return-value]

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """The core's flat output -> torchvision's ``{"cls_logits": (N, anchors, K), "bbox_regression": ...}``."""
        n, offset = flat.shape[0], 0
        outputs: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_regression": []}
        for key, columns in (("cls_logits", self.num_classes), ("bbox_regression", 4)):
            for (h, w), a in zip(self.level_shapes, self.anchors_per_location, strict=True):
                size = a * columns * h * w
                part = flat[:, offset:offset + size].reshape(n, a, columns, h, w)
                outputs[key].append(part.permute(0, 3, 4, 1, 2).reshape(n, -1, columns))
                offset += size
        if offset != flat.shape[1]:
            raise QatError("model", f"the core returned {flat.shape[1]} values per image, expected {offset}",
                           "the core and the detector were built for different resolutions or classes")
        return {key: torch.cat(parts, 1) for key, parts in outputs.items()}

    def forward(self, images: list[Tensor] | Tensor, targets: list[dict[str, Tensor]] | None = None):  # type: ignore[no-untyped-def]
        images = list(images)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        image_list, targets = self.shell.transform(images, targets)
        head_outputs = self.split(self.core(image_list.tensors).float())
        device = head_outputs["cls_logits"].device  # the anchor generator builds its boxes on the grids' device
        grids = [torch.empty(0, 0, h, w, device=device) for h, w in self.level_shapes]
        anchors = self.shell.anchor_generator(image_list, grids)
        if self.training:
            if targets is None:
                raise QatError("train", "the detector is in training mode but got no targets",
                               "pass targets, or call .eval() for inference")
            matched = []
            for anchors_per_image, target in zip(anchors, targets, strict=True):
                if target["boxes"].numel() == 0:
                    matched.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64, device=device))
                    continue
                iou = box_iou(target["boxes"], anchors_per_image)
                matched.append(self.shell.proposal_matcher(iou))
            losses = self.shell.compute_loss(targets, head_outputs, anchors, matched)
            # the N of eq. 1 (matched default boxes in the batch), by which compute_loss divided both terms
            return {**losses, "num_foreground": sum((m >= 0).sum() for m in matched)}
        detections = self.shell.postprocess_detections(head_outputs, anchors, image_list.image_sizes)
        return self.shell.transform.postprocess(detections, image_list.image_sizes, original_sizes)
