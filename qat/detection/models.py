"""SSDLite detectors (Sandler et al. 2018 §6.2; Howard et al. 2019 §6.3) on MobileNet v1/v2/v3-large backbones.

The network is built from torchvision's parts (backbones, ``SSDLite*Head``, ``DefaultBoxGenerator``, ``SSD``)
with random initialisation; weights come from local files, and the backbone's also from torchvision's
pretrained ImageNet weights by name (``model.backbone_weights=IMAGENET1K_V1``, torchvision's cache, see
qat.models.registry; MobileNet v3's backbone then keeps its full tail, as torchvision's SSDLite does). The width
(depth) multiplier scales the backbone and, with a floor of 16 channels, the four extra feature layers, as
the TF object-detection API's ``depth_multiplier``/``min_depth`` do.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteClassificationHead, SSDLiteRegressionHead

from qat.compat.torch_private import ssdlite_extra_block, ssdlite_normal_init
from qat.detection.detector import DetectionCore, SSDLiteDetector, TappedBackbone
from qat.errors import QatError, choice_error
from qat.models.registry import is_weights_name

MIN_DEPTH = 16
MIN_RESOLUTION = 64  # six feature levels: below 64 px the extra layers are all 1x1
_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # torchvision's SSDLite recipe
# post-processing of torchvision's SSDLite320, except at most 100 detections per image (COCOeval's maxDets)
POSTPROCESS = {"score_thresh": 0.001, "nms_thresh": 0.55, "detections_per_img": 100, "topk_candidates": 300}


def _split_inverted_residual(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(expansion 1x1 conv, rest) of a torchvision MobileNet v2/v3 block: SSDLite taps the expansion output."""
    layers = block.conv if hasattr(block, "conv") else block.block
    if block.use_res_connect:
        raise QatError("model.backbone", "the C4 block has a residual connection", "tap a strided block")
    return layers[0], layers[1:]


def _torchvision_stages(features: nn.Sequential) -> list[nn.Module]:
    """Two backbone taps: C4's expansion layer (output stride 16) and the last layer (output stride 32)."""
    strided = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    c4 = strided[-1]
    expansion, rest = _split_inverted_residual(features[c4])
    return [nn.Sequential(*features[:c4], expansion), nn.Sequential(rest, *features[c4 + 1:])]


def _mobilenet_v2(width_mult: float) -> nn.Module:
    return torchvision.models.mobilenet_v2(width_mult=width_mult, norm_layer=_NORM)


def _mobilenet_v3_large(width_mult: float, reduced_tail: bool = True) -> nn.Module:
    # reduced tail (MobileNet v3 Table 6), as torchvision's SSDLite does without a pretrained backbone
    return torchvision.models.mobilenet_v3_large(width_mult=width_mult, reduced_tail=reduced_tail,
                                                 norm_layer=_NORM)


def _mobilenet_v1(width_mult: float) -> nn.Module:
    from qat.models.mobilenet_v1 import MobileNetV1

    return MobileNetV1(depth_multiplier=width_mult)


def _v1_stages(features: nn.Sequential) -> list[nn.Module]:
    """SSD-MobileNet v1 taps conv11 (pointwise, stride 16) and conv13 (stride 32) (Huang et al. 2017)."""
    conv11 = 1 + 2 * 11  # stem, then (depthwise, pointwise) per block: block k's pointwise is index 2k
    return [features[:conv11], features[conv11:]]


BACKBONES: dict[str, tuple[Callable[[float], nn.Module], Callable[[nn.Sequential], list[nn.Module]]]] = {
    "mobilenet_v1": (_mobilenet_v1, _v1_stages),
    "mobilenet_v2": (_mobilenet_v2, _torchvision_stages),
    "mobilenet_v3_large": (_mobilenet_v3_large, _torchvision_stages),
}


def load_state(module: nn.Module, path: str, key: str) -> None:
    """Load a state dict (plain or under a 'model' key) from a local file into ``module``; errors name ``key``."""
    from qat.models.registry import read_state_dict

    file = Path(path).expanduser()
    if not file.is_file():
        raise QatError(key, f"{file} does not exist", "give a local .pt/.pth state-dict file")
    _load_into(module, read_state_dict(file, key), file, key)


def _load_into(module: nn.Module, state: dict, source: str | Path, key: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise QatError(key, f"{source} does not fit this model: {str(exc).splitlines()[0]}",
                       "check model.backbone, model.width_mult and the number of categories") from exc


def _pretrained_backbone(backbone: str, name: str, width_mult: float) -> nn.Module:
    """The ``backbone`` classification network with torchvision's pretrained weights ``name``."""
    from qat.models.registry import pretrained_file, read_state_dict, torchvision_weights

    weights = torchvision_weights(backbone, name, width_mult=width_mult, key="model.backbone_weights")
    net = _mobilenet_v3_large(width_mult, reduced_tail=False) if backbone == "mobilenet_v3_large" \
        else BACKBONES[backbone][0](width_mult)
    file = pretrained_file(weights, "model.backbone_weights")
    _load_into(net, read_state_dict(file, "model.backbone_weights"), file, "model.backbone_weights")
    return net


def build_detector(backbone: str = "mobilenet_v2", *, num_categories: int, width_mult: float = 1.0,
                   resolution: int = 320, weights: str | None = None,
                   backbone_weights: str | None = None) -> SSDLiteDetector:
    """SSDLite at ``resolution`` x ``resolution`` with ``num_categories`` object classes (+ background).

    ``backbone_weights``: a local state dict of the torchvision classification network (e.g. ImageNet);
    ``weights``: a local state dict of the whole detector (e.g. the float weights of an earlier run).
    """
    if backbone not in BACKBONES:
        raise choice_error("model.backbone", backbone, list(BACKBONES))
    if not isinstance(width_mult, int | float) or width_mult <= 0:
        raise QatError("model.width_mult", f"{width_mult!r} is not a positive number", "use e.g. 0.5 or 1.0")
    if resolution < MIN_RESOLUTION:
        raise QatError("model.resolution", f"{resolution} is below {MIN_RESOLUTION}",
                       f"SSDLite takes inputs of at least {MIN_RESOLUTION}x{MIN_RESOLUTION}")
    if num_categories < 1:
        raise QatError("data", "the dataset has no categories", "the annotation file must list categories")
    make, stages = BACKBONES[backbone]
    if weights and is_weights_name(weights):
        raise QatError("model.weights", f"{weights} names torchvision classification weights, not a detector's",
                       f"give them as model.backbone_weights={weights}; model.weights takes a local file")
    if backbone_weights and is_weights_name(backbone_weights):
        net = _pretrained_backbone(backbone, backbone_weights, float(width_mult))
    elif backbone_weights:
        net = make(float(width_mult))
        load_state(net, backbone_weights, "model.backbone_weights")
    else:
        net = make(float(width_mult))
        ssdlite_normal_init(net)  # torchvision's SSDLite initialisation without a pretrained backbone
    taps = stages(net.features)

    def depth(d: int) -> int:
        return max(MIN_DEPTH, int(d * width_mult))

    with torch.no_grad():
        last = nn.Sequential(*taps).eval()(torch.zeros(1, 3, resolution, resolution)).shape[1]
    widths = [last, depth(512), depth(256), depth(256), depth(128)]
    extras = nn.ModuleList([ssdlite_extra_block(widths[i], widths[i + 1], _NORM) for i in range(4)])
    ssdlite_normal_init(extras)
    tapped = TappedBackbone(taps, extras)
    with torch.no_grad():
        features = tapped.eval()(torch.zeros(1, 3, resolution, resolution))
    tapped.train()
    channels = [f.shape[1] for f in features]
    anchors = DefaultBoxGenerator([[2, 3] for _ in channels], min_ratio=0.2, max_ratio=0.95)
    per_location = anchors.num_anchors_per_location()
    num_classes = num_categories + 1
    core = DetectionCore(tapped, SSDLiteClassificationHead(channels, per_location, num_classes, _NORM).module_list,
                         SSDLiteRegressionHead(channels, per_location, _NORM).module_list)
    shell = SSD(nn.Identity(), anchors, (resolution, resolution), num_classes, head=nn.Identity(),
                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], **POSTPROCESS)
    detector = SSDLiteDetector(core, shell, [tuple(f.shape[-2:]) for f in features], per_location, num_classes)
    if weights:
        load_state(detector, weights, "model.weights")
    return detector
