"""Model registry: build a float classifier by name with width multiplier and class count.

torchvision architectures are built as-is (no hand-written "quantizable" copies). Float weights
(``weights``) come from a local file (a state dict, or a qat checkpoint holding one under ``model``), or are
torchvision's pretrained weights named as torchvision names them (``IMAGENET1K_V1``, ``IMAGENET1K_V2``,
``DEFAULT``, or ``ResNet50_Weights.IMAGENET1K_V2``): read from torchvision's own cache
(``$TORCH_HOME/hub/checkpoints/<file name of the weights' URL>``), downloaded there only when missing and the
network allows. Every file is read with ``weights_only`` unpickling (qat.train.checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from qat.errors import QatError, choice_error

log = logging.getLogger("qat")
WEIGHTS_NAME = re.compile(r"(?:[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*_Weights\.)?[A-Z][A-Z0-9_]*")
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: a network that drops packets fails instead of hanging


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
    """torchvision MobileNet v3 (Howard et al. 2019); hardswish, hardsigmoid and the SE product convert to the
    integer model (qat.intmodel.elementwise)."""
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

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bn_momenta(model: nn.Module) -> float | list[float | None] | None:
    """The running-statistics momentum of ``model``'s batch norms, read back: one value, or the distinct ones."""
    values = sorted({m.momentum for m in model.modules() if isinstance(m, BATCH_NORMS)}, key=lambda v: (v is None, v))
    return values[0] if len(values) == 1 else (values or None)


MIN_RESOLUTION = {"inception_v3": 75}  # others: 32 (five stride-2 stages; smaller inputs collapse below 1x1)


def build_model(arch: str, *, width_mult: float = 1.0, num_classes: int = 1000, resolution: int = 224,
                weights: str | None = None, bn_momentum: float | None = None) -> nn.Module:
    """Build ``arch``; with ``weights``, load float weights from a local file (state dict or qat checkpoint)
    or torchvision's pretrained weights named as torchvision names them (``IMAGENET1K_V2``, ``DEFAULT``).
    ``bn_momentum`` (``model.bn_momentum``) replaces the running-statistics momentum of every batch norm; ``None``
    keeps the architecture's own (torchvision's MobileNet v3: 0.01, made for hundreds of ImageNet epochs: after
    the demo's 6 epochs its running statistics were still so far from the data that every validation image got
    the same class; with 0.1 the same training reached 48% after 2 epochs)."""
    if arch not in MODELS:
        raise choice_error("model.arch", arch, list(MODELS))
    if not isinstance(width_mult, int | float) or width_mult <= 0:
        raise QatError("model.width_mult", f"{width_mult!r} is not a positive number", "use e.g. 0.35, 0.5, 1.0")
    smallest = MIN_RESOLUTION.get(arch, 32)
    if resolution < smallest:
        raise QatError("model.resolution", f"{resolution} is below {smallest}",
                       f"{arch} takes inputs of at least {smallest}x{smallest}")
    model = MODELS[arch](float(width_mult), num_classes)
    if bn_momentum is not None:
        if not 0.0 < bn_momentum <= 1.0:
            raise QatError("model.bn_momentum", f"{bn_momentum} is not in (0, 1]", "use 0.1 (PyTorch's default), or "
                           "null for the architecture's own")
        for module in model.modules():
            if isinstance(module, BATCH_NORMS):
                module.momentum = bn_momentum
    if weights and is_weights_name(weights):
        pretrained = torchvision_weights(arch, weights, width_mult=float(width_mult))
        classes = len(pretrained.meta["categories"])
        if classes != num_classes:
            raise QatError("model.weights", f"torchvision's {pretrained} weights classify {classes} ImageNet "
                           f"classes, the dataset has {num_classes}",
                           "use them with data=imagenet, or give a local file trained on these classes")
        state = read_state_dict(pretrained_file(pretrained))
        if arch == "inception_v3":
            state = _inception_without_transform_input(state)
        _load_state(model, state, weights, "model.weights")
    elif weights:
        load_float_weights(model, weights)
    return model


def is_weights_name(value: str) -> bool:
    """True when ``value`` names torchvision pretrained weights (``IMAGENET1K_V2``, ``DEFAULT``,
    ``ResNet50_Weights.IMAGENET1K_V2``) rather than a file path."""
    return WEIGHTS_NAME.fullmatch(value) is not None


def torchvision_weights(arch: str, name: str, *, width_mult: float, key: str = "model.weights") -> Any:
    """torchvision's weights enum member ``name`` for the architecture ``arch`` (``DEFAULT``: the best);
    a QatError naming ``key`` where torchvision has none (qat's own networks, other widths, other names)."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        enum = None
    if enum is None:
        raise QatError(key, f"{arch} is qat's own network: torchvision has no pretrained {name} weights for it",
                       f"give a local state-dict file ({key}=/path/to/{arch}.pth)")
    prefix, _, member = name.rpartition(".")
    if (prefix and prefix != enum.__name__) or member not in enum.__members__:
        raise QatError(key, f"torchvision has no {name} weights for {arch}",
                       f"valid names: {', '.join(enum.__members__)} (or {enum.__name__}.<name>), or a local file")
    if width_mult != 1.0:
        raise QatError(key, f"torchvision's {arch} weights are for model.width_mult=1.0, not {width_mult:g}",
                       "set model.width_mult=1.0, or give a local file trained at this width")
    return enum[member]


def pretrained_file(weights: Any, key: str = "model.weights") -> Path:
    """The file of torchvision ``weights`` in torchvision's cache (``torch.hub.get_dir()/checkpoints/<file
    name of weights.url>``), downloaded there when missing and the network allows; when it cannot be, a
    QatError naming the full path to put the file at and the URL it comes from."""
    url = weights.url
    name = os.path.basename(urllib.parse.urlparse(url).path)
    file = Path(torch.hub.get_dir()) / "checkpoints" / name
    if file.is_file():
        return file
    log.info("downloading torchvision's %s weights: %s -> %s", weights, url, file)
    digest = torch.hub.HASH_REGEX.search(name)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(url, str(file), hash_prefix=digest.group(1) if digest else None)
    except Exception as exc:  # noqa: BLE001 - offline, DNS, HTTP, disk: the same fix
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise QatError(key, f"torchvision's {weights} weights are not in {file} and could not be downloaded "
                       f"({reason})", f"download {url} and put it at {file}") from exc
    return file


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """A default timeout for new sockets (torch.hub's download takes none) while the block runs."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _inception_without_transform_input(state: dict[str, Any]) -> dict[str, Any]:
    """torchvision's Inception v3 weights, for qat's Inception v3 (no auxiliary classifier, no
    ``transform_input``): the auxiliary classifier's tensors are dropped, and the input re-normalisation those
    weights were trained with (ImageNet mean/std -> [-1, 1], per channel ``x * a + b``) is folded into the
    first convolution (weights times ``a``) and its BatchNorm (running mean minus the conv of ``b``). Exact:
    that convolution has no padding, so every output sees ``b`` at all its taps."""
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    scale, shift = std / 0.5, (mean - 0.5) / 0.5
    weight = state["Conv2d_1a_3x3.conv.weight"]
    state["Conv2d_1a_3x3.conv.weight"] = weight * scale.view(1, 3, 1, 1).to(weight.dtype)
    offset = (weight * shift.view(1, 3, 1, 1).to(weight.dtype)).sum(dim=(1, 2, 3))
    state["Conv2d_1a_3x3.bn.running_mean"] = state["Conv2d_1a_3x3.bn.running_mean"] - offset
    return state


def read_state_dict(file: Path, key: str = "model.weights") -> dict[str, Any]:
    """The state dict in ``file`` (plain, or under a ``model`` key of a qat checkpoint), read with
    ``weights_only`` unpickling; an unreadable or unsafe file is a QatError naming ``key`` and the file."""
    from qat.train.checkpoint import CheckpointDamaged, UnsafeCheckpoint, read_checkpoint_file

    try:
        state = read_checkpoint_file(file)
    except UnsafeCheckpoint as exc:
        raise QatError(key, f"{file} {exc.problem}", exc.fix) from exc
    except CheckpointDamaged as exc:
        raise QatError(key, f"{file} is not a readable state dict: it {exc.problem}",
                       "give a .pt/.pth file written by torch.save(model.state_dict())") from exc
    if isinstance(state.get("model"), dict):
        state = state["model"]
    return state


def _load_state(model: nn.Module, state: dict[str, Any], source: str | Path, key: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise QatError(key, f"{source} does not fit this architecture: {first}",
                       "check model.arch, model.width_mult and the dataset's number of classes") from exc


def load_float_weights(model: nn.Module, path: str) -> None:
    """Load a state dict (plain, or under a 'model' key) from a local file, with clear errors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise QatError("model.weights", f"{file} does not exist",
                       "give a local .pt/.pth state-dict file, or torchvision's weights by name (e.g. DEFAULT)")
    _load_state(model, read_state_dict(file), file, "model.weights")


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
