"""Evaluate a saved model on a dataset's validation split (the eval app, ``experiments/eval.py``).

An integer model (``int_model.pt`` of a run) runs on PyTorch's int8 kernels with the architecture, width and
resolution stored in the file; float weights (a state dict, or a run's checkpoint holding one under ``model``) are
loaded into ``model.*``. The result, ``qat.eval/1``, is written as ``eval.json`` into the run directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qat.engines import torch_native
from qat.errors import QatError
from qat.intmodel.graph import FORMAT, IntModel
from qat.models.registry import build_model
from qat.pipeline import load_data, validate
from qat.records import atomic_write_bytes
from qat.schema import DataConfig, ModelConfig, RunConfig
from qat.train.checkpoint import MAGIC, CheckpointDamaged, UnsafeCheckpoint, decode, load_checkpoint
from qat.train.loop import predict, top1, top5

EVAL_NAME = "eval.json"
EVAL_SCHEMA = "qat.eval/1"


@dataclass
class EvalConfig:
    """The eval app's config (``configs/eval.yaml``)."""

    checkpoint: str = "???"  # int_model.pt, or float weights (state dict / run checkpoint)
    backend: str = "x86"  # int8 kernels of PyTorch's quantized engine (torch_native)
    seed: int = 0
    cache_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)  # float weights only; int models carry their own
    data: DataConfig = field(default_factory=DataConfig)


def is_int_model(path: Path) -> bool:
    """True when ``path`` holds a qat integer model (the file's ``format`` field), False when float weights (a
    plain state dict or a run checkpoint, read by :func:`load_float`). Every file is read with ``weights_only``
    unpickling; one that cannot be read is one line naming it, saying what it is and why it is unreadable."""
    if not path.is_file():
        raise QatError("checkpoint", f"{path} does not exist", "give an int_model.pt or a float .pt/.pth file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise QatError("checkpoint", f"{path} cannot be read ({exc.strerror or exc})", "check its permissions") \
            from exc
    try:
        state = decode(path, data)
    except UnsafeCheckpoint as exc:
        raise QatError("checkpoint", f"{path} {exc.problem}", exc.fix) from exc
    except CheckpointDamaged as exc:
        if data.startswith(MAGIC):
            what, fix = "is a qat checkpoint (float weights), but", "use an undamaged copy of it"
        elif FORMAT.encode() in data[:1 << 20]:  # the format string, near the start of the pickle, survives
            what, fix = "is a qat integer model, but", "copy it again, or convert the model again"
        else:
            what, fix = "is neither an integer model nor float weights qat can read:", \
                "give an int_model.pt or a float .pt/.pth file"
        raise QatError("checkpoint", f"{path} {what} it {exc.problem}", fix) from exc
    return state.get("format") == FORMAT


def load_float(model: torch.nn.Module, path: Path) -> None:
    """Load float weights from a state dict or a run checkpoint (``qat.train.checkpoint``, weights under
    ``model``) into ``model``; a file of another architecture is one line naming ``checkpoint``."""
    try:
        state = load_checkpoint(path)
    except QatError as exc:
        raise QatError("checkpoint", f"{path}: {exc.problem}", "give an int_model.pt or a float state-dict file") \
            from exc
    if isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise QatError("checkpoint", f"{path} does not fit this architecture: {str(exc).splitlines()[0]}",
                       "set model=..., model.width_mult and data to those it was trained with") from exc


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on ``cfg.data``'s validation split; return the result (no file written)."""
    path = Path(cfg.checkpoint).expanduser()
    integer = is_int_model(path)
    model_cfg = cfg.model
    if integer:
        int_model = IntModel.load(path)
        meta = int_model.meta
        model_cfg = ModelConfig(arch=str(meta.get("arch", "?")), width_mult=float(meta.get("width_mult", 0.0)),
                                resolution=int(meta.get("resolution", int_model.input_shape[-1])))
    run = RunConfig(seed=cfg.seed, cache_dir=cfg.cache_dir, model=model_cfg, data=cfg.data)
    validate(run)  # model and data names, data.root layout
    data, info = load_data(run)
    if integer:
        classes = meta.get("num_classes")
        if classes is not None and int(classes) != info["num_classes"]:
            raise QatError("checkpoint", f"{path} predicts {classes} classes, the dataset has {info['num_classes']}",
                           "evaluate it on the dataset it was trained on")
        net = torch_native.build(int_model, cfg.backend)
        engine = torch_native.engine_info(cfg.backend)["engine"]
    else:
        net = build_model(model_cfg.arch, width_mult=model_cfg.width_mult, num_classes=info["num_classes"],
                          resolution=model_cfg.resolution)
        load_float(net, path)
        engine = "torch_eager"
    logits, predicted, targets = predict(net, data.val, desc="eval")
    return {"schema": EVAL_SCHEMA, "checkpoint": str(path.resolve()), "kind": "int8" if integer else "float",
            "engine": engine, "model": {"arch": model_cfg.arch, "width_mult": model_cfg.width_mult,
                                        "resolution": model_cfg.resolution},
            "data": info, "accuracy": {"top1": top1(predicted, targets), "top5": top5(logits, targets)}}


def info_line(info: dict[str, Any]) -> str:
    """The dataset of a result's ``data`` block, in words."""
    return f"{info['name']} val ({info['val_size']} images, {info['num_classes']} classes)"


def eval_app(cfg: DictConfig, run_dir: str | Path) -> float:
    """The eval app: evaluate, write ``<run_dir>/eval.json`` atomically, print one summary line; returns the
    top-1 (the sweep objective)."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise QatError("checkpoint", "not set", "pass checkpoint=<int_model.pt or float .pt/.pth file>")
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, EvalConfig)
    result = evaluate(config)
    out = Path(run_dir) / EVAL_NAME
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"{result['kind']} {result['model']['arch']} top-1 {result['accuracy']['top1']:.2f}% "
          f"top-5 {result['accuracy']['top5']:.2f}% on {info_line(result['data'])} -> {out}")
    return float(result["accuracy"]["top1"])


__all__ = ["EVAL_NAME", "EvalConfig", "eval_app", "evaluate", "info_line", "is_int_model", "load_float"]
