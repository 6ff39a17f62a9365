"""The one training engine: every task (classification, detection) and every phase (float, QAT) trains here.

A task supplies only what differs (:class:`Task`): the loss of one batch and, for ``train.keep_best``, its
validation metric. The engine owns the rest, as torchvision's references share one ``train_one_epoch`` between
float and quantized training: device and DDP (``qat.train.distributed``), AMP, the NHWC memory format, the
learning-rate schedule, the schedule hook of simulated quantization (``before_step``), atomic checksummed
checkpoints each epoch and every ``train.checkpoint_every_steps`` steps with exact mid-epoch resume (RNG state
included), the best-validation checkpoint, the non-finite guard, per-step tracking and one log line per epoch.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from qat.errors import QatError, choice_error
from qat.tracking import RUN_ID_KEY, RunLogger
from qat.train.checkpoint import previous_path, resume_state, rng_state, save_checkpoint, set_rng_state
from qat.train.distributed import Runtime, amp_dtype, wrap
from qat.train.loop import BatchLoss, NonFiniteLoss, OptimConfig, build_optimizer, lr_at, train_epoch

log = logging.getLogger("qat")


class TrainSettings(Protocol):
    """The ``train`` config keys the engine reads (:class:`qat.schema.TrainConfig` has them all)."""

    checkpoint_every_steps: int
    keep_best: bool
    compile: bool
    compile_mode: str
    amp: str
    channels_last: bool


@dataclass(frozen=True)
class Task:
    """What a task gives the engine. ``loss(device, memory_format)`` returns the batch loss function
    (``(model, batch) -> (loss, batch size)``, moving the batch itself); ``validate(model)`` is the metric kept
    by ``train.keep_best`` (higher is better), named ``metric`` in the log; ``None`` disables it."""

    loss: Callable[[torch.device, torch.memory_format], BatchLoss]
    validate: Callable[[nn.Module], float] | None = None
    metric: str = "top-1"


CPU_AUTOCAST_NCHW = ("NHWC under CPU autocast gave NaN gradients at random in oneDNN's bf16 kernels (SSDLite's "
                     "small extra layers, torch 2.14.1), so this run trains NCHW")


def memory_format(train: TrainSettings, device: torch.device) -> tuple[torch.memory_format, str | None]:
    """The layout the engine trains in, and why it is not the configured one: ``train.channels_last`` (NHWC),
    except under CPU autocast (:data:`CPU_AUTOCAST_NCHW`; logged and recorded, never silent)."""
    if not train.channels_last:
        return torch.contiguous_format, None
    if device.type == "cpu" and amp_dtype(train.amp, device) is not None:
        return torch.contiguous_format, CPU_AUTOCAST_NCHW
    return torch.channels_last, None


PHASE_LR_KEYS = {"float": "optim.lr", "qat": "train.qat_lr"}  # the config key of each phase's learning rate


def fit(model: nn.Module, loader: Any, task: Task, *, train: TrainSettings, optim: OptimConfig, seed: int,
        phase: str, epochs: int, lr: float, checkpoint: Path,
        before_step: Callable[[int], None] | None = None, tracker: RunLogger | None = None,
        runtime: Runtime | None = None) -> nn.Module:
    """Train ``model`` for ``epochs`` epochs of ``loader`` with ``optim`` at base learning rate ``lr`` (the config
    key :data:`PHASE_LR_KEYS` names for ``phase`` is the one a diverging run's error names; fine-tuning phases
    have no warm-up), resuming from ``checkpoint`` (or its previous copy) when one exists: consumed batches are
    skipped and the RNG state restored, so a resumed run trains exactly as an uninterrupted one. Every epoch's
    randomness depends only on (``seed``, epoch). A NaN/Inf loss or weights stop the run with the last good
    checkpoint kept. Under DDP (``runtime``) every rank trains its shard and rank 0 alone writes checkpoints and
    validates. Returns ``model`` in NCHW memory format."""
    tracker = tracker or RunLogger()
    runtime = runtime or Runtime()
    lr_key = PHASE_LR_KEYS[phase]
    optim = optim if phase == "float" else replace(optim, warmup_epochs=0.0)  # fine-tuning: no warm-up
    amp = amp_dtype(train.amp, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type) if amp is torch.float16 else None
    layout, why = memory_format(train, runtime.device)
    if why:
        log.warning("[%s] train.channels_last: %s", phase, why)
    model.to(memory_format=layout)  # parameters (and so optimizer state) in the training layout
    train_model = wrap(model, runtime)
    if train.compile:  # the training forward only: validation and checkpoints use ``model``
        train_model = compiled(train_model, train.compile_mode)
    optimizer = build_optimizer(model, optim, lr)
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch
    every = train.checkpoint_every_steps
    start_epoch, step, skip, rng, best = 0, 0, 0, None, float("-inf")
    best_path = checkpoint.with_name(checkpoint.name.replace("_last", "_best"))
    found = resume_state(checkpoint)
    if found is not None:
        state, source = found
        model.load_state_dict(state["model"])  # tensors land on the model's device
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = state["epoch"], state["step"]
        skip, rng = state.get("batch_in_epoch", 0), state.get("rng")
        best = state.get("best_top1", best)
        log.info("[%s] resuming from %s at epoch %d, batch %d", phase, source, start_epoch, skip)

    def save(epoch: int, batch: int, next_step: int) -> None:
        bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise NonFiniteLoss(next_step - 1, float("nan"), what=f"weight {bad}")
        save_checkpoint(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                     "epoch": epoch, "batch_in_epoch": batch, "step": next_step, "phase": phase,
                                     "rng": rng_state(), RUN_ID_KEY: tracker.run_id, "best_top1": best,
                                     **({"scaler": scaler.state_dict()} if scaler is not None else {})})

    def after_step(s: int, loss: float, lr_now: float, epoch: int, first_step: int) -> None:
        tracker.log_step(phase, s, {"loss": loss, "lr": lr_now, "epoch": (s + 1) / steps_per_epoch})
        batch = s + 1 - first_step
        if every and runtime.is_main and (s + 1) % every == 0 and batch < steps_per_epoch:
            save(epoch, batch, s + 1)

    batch_loss = task.loss(runtime.device, layout)
    start_norms = parameter_norms(model)  # a divergence names the parameter that grew most since here
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.time()
            # every epoch's randomness (shuffle, augmentation) depends only on (seed, epoch): resumes are exact
            torch.manual_seed(seed * 1000 + epoch)
            if getattr(loader, "generator", None) is not None:
                loader.generator.manual_seed(seed * 1000 + epoch)
            if hasattr(getattr(loader, "sampler", None), "set_epoch"):
                loader.sampler.set_epoch(epoch)
            first_step, saved_rng = step - skip, rng
            step, loss = train_epoch(train_model, loader, optimizer, step=step, loss=batch_loss,
                                     before_step=before_step, device=runtime.device, amp=amp, scaler=scaler,
                                     after_step=lambda s, loss, lr_now, e=epoch, f=first_step: after_step(
                                         s, loss, lr_now, e, f),
                                     lr_fn=lambda s: lr_at(optim, lr, s, total, steps_per_epoch),
                                     desc=f"{phase} {epoch + 1}/{epochs}", skip_batches=skip,
                                     after_skip=None if saved_rng is None else lambda r=saved_rng: set_rng_state(r))
            skip, rng = 0, None
            if runtime.is_main:
                if train.keep_best and task.validate is not None:  # <phase>_best.pt: best validation so far
                    value = task.validate(model)
                    if value > best:
                        best = value
                        save_checkpoint(best_path, {"model": model.state_dict(), "epoch": epoch + 1,
                                                    "top1": value, "phase": phase}, keep_previous=False)
                    log.info("[%s] epoch %d val %s %.2f%% (best %.2f%%)", phase, epoch + 1, task.metric, value,
                             best)
                save(epoch + 1, 0, step)
            runtime.barrier()  # nobody runs ahead of the checkpoint it would resume from
            log.info("[%s] epoch %d/%d  loss %.4f  (%.1f s)", phase, epoch + 1, epochs, loss, time.time() - t0)
    except NonFiniteLoss as exc:
        kept = next((p for p in (checkpoint, previous_path(checkpoint)) if p.exists()), None)
        where = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint had been written yet"
        name, growth = most_grown(model, start_norms)
        blame = f"; the parameter that grew most is {name} ({growth})" if name else ""
        bn_fix = (" or freeze batch norm from the first step with schedule.bn_freeze_step=0"
                  if phase == "qat" and name and is_batch_norm_parameter(model, name) else "")
        raise QatError(lr_key, f"{exc.what} became {exc.value} at step {exc.step} of the {phase} phase{blame}",
                       f"lower {lr_key}{bn_fix}; {where}") from exc
    if train_model is not model:  # DDP: drop the wrapper now; its reducer's autograd hooks go with it
        del train_model
        gc.collect()
    return model.to(memory_format=torch.contiguous_format)  # what follows (conversion, engines) sees NCHW


def parameter_norms(model: nn.Module) -> dict[str, float]:
    """The L2 norm of every parameter (one number each: cheap enough to take once per phase)."""
    with torch.no_grad():
        return {name: float(p.detach().float().norm()) for name, p in model.named_parameters()}


def most_grown(model: nn.Module, start: dict[str, float]) -> tuple[str | None, str]:
    """The parameter whose norm grew most since ``start`` (a non-finite one first) and how, for the divergence
    error: the loss of a diverging QAT run explodes after one layer's parameters did (e.g. a folded batch norm's
    gamma through the batch-variance gradient, issue 21)."""
    worst, ratio = None, 0.0
    for name, now in parameter_norms(model).items():
        if not math.isfinite(now):
            return name, "not finite"
        grown = now / max(start.get(name, now), 1e-12)
        if grown > ratio:
            worst, ratio = name, grown
    return (worst, f"{ratio:.3g}x its norm when the phase began") if worst is not None and ratio > 1.0 else (None, "")


def is_batch_norm_parameter(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to a batch norm (folded or not)."""
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return isinstance(owner, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledSteps(nn.Module):
    """``torch.compile(model, mode=...)`` for training steps. Every call starts a new step for torch's CUDA-graph
    trees (``reduce-overhead``, ``max-autotune``: the previous step's graph outputs may then be overwritten). The
    first call runs eagerly: a quantizer's ranges and (S, Z) take their shapes at its first observation
    (:mod:`qat.quant.state`), and buffers created inside a CUDA graph would be that graph's outputs."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.compiled = torch.compile(model, mode=mode)
        self.eager_calls_left = 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.eager_calls_left:
            self.eager_calls_left -= 1
            return self.compiled._orig_mod(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args, **kwargs)


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise choice_error("train.compile_mode", mode, COMPILE_MODES)


def compiled(model: nn.Module, mode: str) -> nn.Module:
    """The training forward compiled in ``train.compile_mode``."""
    check_compile_mode(mode)
    return CompiledSteps(model, mode)


def describe(train: TrainSettings, runtime: Runtime, loader: Any) -> dict[str, Any]:
    """The record's ``training`` block: how the engine trained (device, processes, batch size per process read from
    ``loader``, autocast dtype, memory format, step checkpoints), resolved as :func:`fit` resolves them, not copied
    from the config."""
    amp = amp_dtype(train.amp, runtime.device)
    layout, why = memory_format(train, runtime.device)
    return {"device": str(runtime.device), "world_size": runtime.world_size,
            "batch_size_per_process": getattr(loader, "batch_size", None),
            "autocast": str(amp).removeprefix("torch.") if amp is not None else "none",
            "memory_format": "channels_last" if layout is torch.channels_last else "contiguous",
            **({"memory_format_reason": why} if why else {}),
            "checkpoint_every_steps": train.checkpoint_every_steps, "compiled": train.compile,
            "compile_mode": train.compile_mode if train.compile else None}


__all__ = ["COMPILE_MODES", "CPU_AUTOCAST_NCHW", "PHASE_LR_KEYS", "CompiledSteps", "Task", "TrainSettings",
           "check_compile_mode", "compiled", "describe", "fit", "memory_format"]
