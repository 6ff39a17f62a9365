"""Training and evaluation loops (plain PyTorch; progress bars on a terminal, one log line per epoch)."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from qat.errors import QatError, choice_error
from qat.quant.lsq import step_parameters

log = logging.getLogger("qat")


def progress(iterable, total: int, desc: str):  # type: ignore[no-untyped-def]
    """A tqdm bar when stderr is a terminal; the bare iterable otherwise (logs carry the progress)."""
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


@dataclass
class OptimConfig:
    """Optimizer as the papers used them: SGD with momentum (whitepaper) or RMSProp (Jacob, MobileNet)."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-5
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | step | constant
    step_epochs: int = 30
    step_gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0 (Goyal et al. 2017), then the schedule


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """Weight decay on weights only; learned quantizer step sizes (:mod:`qat.quant.lsq`) in groups of their own,
    without weight decay and with their learning-rate multiplier (``lr_scale``, applied by :func:`train_epoch`)."""
    lr = cfg.lr if lr is None else lr
    steps: dict[float, list[nn.Parameter]] = {}
    for p, scale in step_parameters(model):
        steps.setdefault(scale, []).append(p)
    learned = {id(p) for ps in steps.values() for p in ps}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in learned:
            (no_decay if p.dim() <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    groups += [{"params": ps, "weight_decay": 0.0, "lr_scale": scale, "lr": lr * scale} for scale, ps in steps.items()]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=cfg.momentum, alpha=0.9, eps=1.0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise choice_error("optim.name", cfg.name, ["sgd", "rmsprop", "adamw"])


def lr_at(cfg: OptimConfig, base_lr: float, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning rate at a global step: linear warm-up, then cosine to zero, step decay every ``step_epochs``,
    or constant."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        return 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    if cfg.schedule == "step":
        return base_lr * cfg.step_gamma ** (step // max(cfg.step_epochs * steps_per_epoch, 1))
    if cfg.schedule == "constant":
        return base_lr
    raise choice_error("optim.schedule", cfg.schedule, ["cosine", "step", "constant"])


class NonFiniteLoss(QatError):
    """The loss (or, see ``qat.pipeline.fit``, the weights) became NaN or Inf at ``step``."""

    def __init__(self, step: int, value: float, what: str = "loss") -> None:
        super().__init__("optim.lr", f"{what} became {value} at step {step}", "lower the learning rate")
        self.step, self.value, self.what = step, value, what


BatchLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]
"""A task's loss of one batch: ``(model, batch) -> (loss, number of samples)``; it moves the batch itself."""


def classification_loss(device: torch.device, memory_format: torch.memory_format = torch.contiguous_format
                        ) -> BatchLoss:
    """Cross-entropy of an ``(images, targets)`` batch, the images on ``device`` in ``memory_format``."""

    def loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        images, targets = batch
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        return F.cross_entropy(model(images).float(), targets), images.shape[0]

    return loss


def train_epoch(model: nn.Module, loader: Iterable[Any], optimizer: torch.optim.Optimizer, *, step: int,
                lr_fn: Callable[[int], float], loss: BatchLoss,
                before_step: Callable[[int], None] | None = None,
                after_step: Callable[[int, float, float], None] | None = None,
                desc: str = "train", device: torch.device | None = None, amp: torch.dtype | None = None,
                scaler: torch.amp.GradScaler | None = None, skip_batches: int = 0,
                after_skip: Callable[[], None] | None = None) -> tuple[int, float]:
    """One pass over ``loader`` with the task's batch ``loss`` (:data:`BatchLoss`); returns (next global step,
    mean loss). Stops on a non-finite loss (:class:`NonFiniteLoss`). A resumed epoch passes ``skip_batches``:
    those batches are drawn (so shuffling and augmentation stay in step) but not trained on, and ``after_skip()``
    runs before the next one is drawn (to restore the RNG state saved with a mid-epoch checkpoint).
    ``after_step(step, loss, lr)`` is called after each optimizer step (metrics logging). ``amp`` is the autocast
    dtype on ``device`` (None: float32), ``scaler`` the fp16 loss scaler."""
    from qat.train.distributed import autocast

    model.train()
    total, count = 0.0, 0
    device = device or torch.device("cpu")
    for index, batch in enumerate(progress(loader, len(loader), desc)):  # type: ignore[arg-type]
        if index < skip_batches:
            if index == skip_batches - 1 and after_skip is not None:
                after_skip()
            continue
        if before_step is not None:
            before_step(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_fn(step) * group.get("lr_scale", 1.0)
        with autocast(device, amp):
            value, samples = loss(model, batch)
        if not torch.isfinite(value):
            raise NonFiniteLoss(step, value.item())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            value.backward()
            optimizer.step()
        loss_value = value.item()
        total += loss_value * samples
        count += samples
        if after_step is not None:
            after_step(step, loss_value, optimizer.param_groups[0]["lr"])
        step += 1
    return step, total / max(count, 1)


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, desc: str = "eval",
            device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, predicted classes and targets over ``loader`` (in loader order), on the CPU; images go to
    ``device`` first when given (engines take CPU tensors)."""
    if isinstance(model, nn.Module):
        model.eval()
    logits, targets = [], []
    for images, target in progress(loader, len(loader), desc):
        if device is not None:
            images = images.to(device, non_blocking=True)
        logits.append(model(images).float().cpu())
        targets.append(target)
    out = torch.cat(logits)
    return out, out.argmax(1), torch.cat(targets)


def top1(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (predicted == targets).float().mean().item()


def top5(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-5 accuracy (recall@5, Jacob Table 4.3) in percent; top-k with k = number of classes below 5."""
    k = min(5, logits.shape[1])
    return 100.0 * (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).float().mean().item()
