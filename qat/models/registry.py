"""Model registry: build a float classifier by name with width multiplier and class count.

torchvision architectures are built as-is (no hand-written "quantizable" copies). Pretrained torchvision
weights are loaded only from a local file (``weights``), never downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from qat.errors import QatError, choice_error


def _mobilenet_v2(width_mult: float, num_classes: int) -> nn.Module:
    return torchvision.models.mobilenet_v2(width_mult=width_mult, num_classes=num_classes)


def _resnet(name: str) -> Callable[[float, int], nn.Module]:
    def build(width_mult: float, num_classes: int) -> nn.Module:
        if width_mult != 1.0:
            raise QatError("model.width_mult", f"{name} has no width multiplier", "set model.width_mult=1.0")
        return getattr(torchvision.models, name)(num_classes=num_classes)

    return build


def _mobilenet_v1(width_mult: float, num_classes: int) -> nn.Module:
    from qat.models.mobilenet_v1 import MobileNetV1

    return MobileNetV1(num_classes=num_classes, depth_multiplier=width_mult)


def _inception_v3(width_mult: float, num_classes: int) -> nn.Module:
    if width_mult != 1.0:
        raise QatError("model.width_mult", "inception_v3 has no width multiplier", "set model.width_mult=1.0")
    return torchvision.models.inception_v3(num_classes=num_classes, aux_logits=False, init_weights=True)


def _mobilenet_v3(name: str) -> Callable[[float, int], nn.Module]:
    """torchvision MobileNet v3 (Howard et al. 2019); hardswish/SE simulate, but have no integer form yet."""
    def build(width_mult: float, num_classes: int) -> nn.Module:
        return getattr(torchvision.models, name)(width_mult=width_mult, num_classes=num_classes)
    return build


MODELS: dict[str, Callable[[float, int], nn.Module]] = {
    "inception_v3": _inception_v3,
    "mobilenet_v1": _mobilenet_v1,
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v3_small": _mobilenet_v3("mobilenet_v3_small"),
    "mobilenet_v3_large": _mobilenet_v3("mobilenet_v3_large"),
    **{name: _resnet(name) for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
}

MIN_RESOLUTION = {"inception_v3": 75}  # others: 32 (five stride-2 stages; smaller inputs collapse below 1x1)


def build_model(arch: str, *, width_mult: float = 1.0, num_classes: int = 1000, resolution: int = 224,
                weights: str | None = None) -> nn.Module:
    """Build ``arch``; load float weights from a local checkpoint file if ``weights`` is given."""
    if arch not in MODELS:
        raise choice_error("model.arch", arch, list(MODELS))
    if not isinstance(width_mult, int | float) or width_mult <= 0:
        raise QatError("model.width_mult", f"{width_mult!r} is not a positive number", "use e.g. 0.35, 0.5, 1.0")
    smallest = MIN_RESOLUTION.get(arch, 32)
    if resolution < smallest:
        raise QatError("model.resolution", f"{resolution} is below {smallest}",
                       f"{arch} takes inputs of at least {smallest}x{smallest}")
    model = MODELS[arch](float(width_mult), num_classes)
    if weights:
        load_float_weights(model, weights)
    return model


def load_float_weights(model: nn.Module, path: str) -> None:
    """Load a state dict (plain, or under a 'model' key) from a local file, with clear errors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise QatError("model.weights", f"{file} does not exist", "give a local .pt/.pth state-dict file")
    from qat.train.checkpoint import MAGIC, read_checkpoint_file

    with open(file, "rb") as handle:
        ours = handle.read(len(MAGIC)) == MAGIC
    try:  # qat's own checksummed checkpoints (cached float weights, run checkpoints), else a plain state dict
        state = read_checkpoint_file(file) if ours else torch.load(file, map_location="cpu", weights_only=True)
    except QatError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise QatError("model.weights", f"{file} is not a readable state dict ({type(exc).__name__})",
                       "give a .pt/.pth file written by torch.save(model.state_dict())") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise QatError("model.weights", f"{file} does not fit this architecture: {first}",
                       "check model.arch, model.width_mult and model.num_classes") from exc


def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-accumulates of one forward pass at ``resolution`` (conv and linear layers)."""
    macs = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        macs += output.numel() // output.shape[0] * kernel

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        macs += module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution, device=next(model.parameters()).device))
    model.train(was_training)
    for h in handles:
        h.remove()
    return int(macs)
