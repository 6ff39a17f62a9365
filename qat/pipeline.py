"""One classification run, end to end (the spine of the framework):

float model -> (train or load float weights) -> evaluate float -> prepare simulated quantization ->
calibrate -> QAT fine-tune with the schedule -> evaluate simulated -> convert to the canonical integer
model -> evaluate it on a real int8 engine -> measure batch-1 latency of float and int8 -> one record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qat import targets
from qat.data.imagefolder import ClassificationData, build_classification_loaders, check_layout
from qat.data.synthetic import default_cache_dir, make_demo_dataset
from qat.engines import registry
from qat.errors import NoIntegerForm, QatError, choice_error
from qat.fidelity import check_engine_names, evaluate_engines, primary_engine
from qat.intmodel.convert import convert
from qat.intmodel.graph import IntModel
from qat.latency.subprocess import MeasureSpec, measure_in_subprocess
from qat.models.registry import MODELS, build_model, count_macs
from qat.ptq.driver import check_method, not_convertible_reason, prepare_and_post_train, record_method
from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare
from qat.record_blocks import apply_target, quant_block, saturation_block
from qat.records import write_record
from qat.schema import RunConfig
from qat.tracking import RunLogger
from qat.train import engine
from qat.train.checkpoint import reuse_or_train
from qat.train.distributed import Runtime, exact_float32
from qat.train.distributed import setup as setup_runtime
from qat.train.loop import classification_loss, predict, top1, top5

log = logging.getLogger("qat")

PRECISIONS = ("float", "int8")
# latency.engine: torch_native (with latency.backend) or any int8 engine of the registry
ENGINES = ("auto", "torch_native", *[name for name, e in registry.ENGINES.items() if "int8" in e.precisions])
DATASETS = ("demo", "imagefolder")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validate(cfg: RunConfig) -> None:
    """Cheap checks of every name and path before any work is done."""
    if cfg.model.arch not in MODELS:
        raise choice_error("model.arch", cfg.model.arch, list(MODELS))
    if cfg.quant.precision not in PRECISIONS:
        raise choice_error("quant.precision", cfg.quant.precision, PRECISIONS)
    check_method(cfg.method)
    if cfg.latency.engine not in ENGINES:
        raise choice_error("latency.engine", cfg.latency.engine, ENGINES)
    check_engine_names(cfg.latency.eval_engines)
    deployment, _ = targets.plan(cfg.target.name, cfg.quant, cfg.target.avx2_grid)  # refuses what cannot run
    if cfg.quant.precision != "float":
        targets.check_installed(deployment.target, [primary_int8_engine(cfg)])
    if cfg.data.name not in DATASETS:
        raise choice_error("data.name", cfg.data.name, DATASETS)
    if cfg.data.name == "imagefolder":
        if not cfg.data.root:
            raise QatError("data.root", "is not set", "give the folder holding train/ and val/")
        check_layout(cfg.data.root)


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def load_data(cfg: RunConfig, distributed: bool = False) -> tuple[ClassificationData, dict[str, Any]]:
    d = cfg.data
    if d.name == "demo":
        root = make_demo_dataset(cache_dir(cfg) / "data", **asdict(d.demo))
    else:
        root = Path(str(d.root)).expanduser()
    data = build_classification_loaders(root, resolution=cfg.model.resolution, batch_size=d.batch_size,
                                        workers=d.workers, train_crop_scale=tuple(d.train_crop_scale),
                                        resize_ratio=d.resize_ratio, seed=cfg.seed, distributed=distributed)
    val = build_classification_loaders(root, resolution=cfg.model.resolution, batch_size=d.eval_batch_size,
                                       workers=d.workers, resize_ratio=d.resize_ratio, seed=cfg.seed).val
    data = ClassificationData(data.train, val, data.class_names)
    info = {"name": d.name, "root": str(root), "num_classes": len(data.class_names),
            "train_size": len(data.train.dataset), "val_size": len(data.val.dataset)}
    return data, info


def float_key(cfg: RunConfig, data_info: dict[str, Any]) -> str:
    """Identity of the float training recipe: same key, same float weights."""
    recipe = {"model": asdict(cfg.model), "data": {**asdict(cfg.data), "root": data_info["root"]},
              "optim": asdict(cfg.optim), "epochs": cfg.train.float_epochs, "seed": cfg.seed, "v": 1,
              "channels_last": cfg.train.channels_last}  # another summation order: other weights
    recipe["model"].pop("weights")
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def fit(model: nn.Module, data: ClassificationData, cfg: RunConfig, *, phase: str, epochs: int, lr: float,
        checkpoint: Path, before_step=None, tracker: RunLogger | None = None,  # type: ignore[no-untyped-def]
        runtime: Runtime | None = None) -> nn.Module:
    """Classification on the training engine (:func:`qat.train.engine.fit`): cross-entropy on ``data.train``,
    validation top-1 on ``data.val`` for ``train.keep_best``."""
    runtime = runtime or Runtime()

    def validate(trained: nn.Module) -> float:
        _, predicted, targets = predict(trained, data.val, desc=f"val {phase}", device=runtime.device)
        return top1(predicted, targets)

    return engine.fit(model, data.train, engine.Task(loss=classification_loss, validate=validate), train=cfg.train,
                      optim=cfg.optim, seed=cfg.seed, phase=phase, epochs=epochs, lr=lr, checkpoint=checkpoint,
                      before_step=before_step, tracker=tracker, runtime=runtime)


def float_weights(model: nn.Module, data: ClassificationData, cfg: RunConfig, data_info: dict[str, Any],
                  run_dir: Path, tracker: RunLogger | None = None, runtime: Runtime | None = None) -> str:
    """Load or train the float weights; return where they came from."""
    if cfg.model.weights:
        return f"file:{cfg.model.weights}"  # loaded by build_model
    return reuse_or_train(
        model, cache_dir(cfg) / "float" / f"{float_key(cfg, data_info)}.pt", enabled=cfg.train.cache_float,
        write=runtime is None or runtime.is_main,
        train=lambda: fit(model, data, cfg, phase="float", epochs=cfg.train.float_epochs, lr=cfg.optim.lr,
                          checkpoint=run_dir / "checkpoints" / "float_last.pt", tracker=tracker, runtime=runtime))


def measure_latency(cfg: RunConfig, *, engine: str, precision: str, int_model: Path | None = None,
                    num_classes: int = 1000) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latency of the run's float or int8 model measured in a fresh subprocess with fixed threads and CPU
    affinity (qat.latency.subprocess); returns (latency block, host description of the measuring process).
    Float models are timed with the run's architecture (weights do not change the work done)."""
    lat = cfg.latency
    spec = MeasureSpec(engine=engine, precision=precision, int_model=str(int_model) if int_model else None,
                       arch=cfg.model.arch, width_mult=cfg.model.width_mult, num_classes=num_classes,
                       resolution=cfg.model.resolution, batch=lat.batch, threads=lat.threads, warmup=lat.warmup,
                       repeats=lat.repeats, min_time_s=lat.min_time_s, seed=cfg.seed)
    result = measure_in_subprocess(spec)
    block = {**result["engine"], **result["stats"], "device": "cpu", "threads_in_child": result["child"]}
    return block, result["host"]


def model_id(cfg: RunConfig, float_source: str) -> str:
    q = cfg.quant
    blob = json.dumps({"model": asdict(cfg.model), "quant": asdict(q), "schedule": asdict(cfg.schedule),
                       "train": asdict(cfg.train), "data": cfg.data.name, "seed": cfg.seed,
                       "float": float_source, **({"ptq": asdict(cfg.ptq)} if cfg.method == "ptq" else {})},
                      sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    tag = "float" if q.precision == "float" else f"w{q.weight_bits}a{q.act_bits}"
    return f"{cfg.model.arch}-w{cfg.model.width_mult:g}-r{cfg.model.resolution}-{tag}-{digest}"


def metric_name(key: str) -> str:
    """Tracker name of an accuracy key: top1, top1/float, top1/sim, top1/int, top5, top5/float, ..."""
    if key in ("top1", "top5"):
        return key
    stage, _, kind = key.rpartition("_")
    return f"{kind}/{stage}"


def primary_int8_engine(cfg: RunConfig) -> str:
    """The engine whose int8 accuracy is the run's top-1 (the latency engine)."""
    return primary_engine(cfg.latency.engine, cfg.latency.backend, cfg.target.name)


def quantize_and_finetune(model: nn.Module, data: ClassificationData, cfg: RunConfig, run_dir: Path,
                          tracker: RunLogger, runtime: Runtime) -> nn.Module:
    """Prepare simulated quantization, calibrate the ranges, then QAT fine-tuning with the schedule."""
    q = cfg.quant
    qconfig = QuantConfig(**{k: v for k, v in asdict(q).items() if k not in ("precision", "calibration_batches")})
    example = torch.zeros(1, 3, cfg.model.resolution, cfg.model.resolution, device=runtime.device)
    prepared = prepare(model, qconfig, example)
    # calibration batches depend on the seed alone, not on what ran before: a resumed run skips float training
    torch.manual_seed(cfg.seed)
    if data.train.generator is not None:
        data.train.generator.manual_seed(cfg.seed)
    with calibration_mode(prepared), torch.no_grad():
        for i, (images, _) in enumerate(data.train):
            if i >= q.calibration_batches:
                break
            prepared(images.to(runtime.device))
    sched = cfg.schedule
    fit(prepared, data, cfg, phase="qat", epochs=cfg.train.qat_epochs, lr=cfg.train.qat_lr,
        checkpoint=run_dir / "checkpoints" / "qat_last.pt",
        before_step=lambda step: sched.apply(prepared, step), tracker=tracker, runtime=runtime)
    sched.apply(prepared, cfg.train.qat_epochs * len(data.train))
    return prepared


def integer_form(prepared: nn.Module) -> tuple[IntModel | None, str | None]:
    """The canonical integer model of ``prepared``, or why it has none: only a documented gap (an op without
    an integer form yet, e.g. MobileNet v3's hardswish; a two-tensor layer, Choukroun §3.3) gives a reason, and
    the run then records simulated accuracy only. Any other conversion error (an uncalibrated quantizer, an
    activation that cannot be fused) is raised: the run stops with its one line."""
    reason = not_convertible_reason(prepared)
    if reason is not None:
        return None, reason
    try:
        return convert(prepared.cpu()), None
    except NoIntegerForm as exc:
        return None, exc.one_line()


def run_classification(cfg: RunConfig, run_dir: str | Path, tracker: RunLogger | None = None) -> dict[str, Any]:
    """Run the whole pipeline for one config and write ``<run_dir>/record.json``; return the record.
    ``tracker`` (qat.tracking) receives per-step training metrics, the top-1s and the record."""
    tracker = tracker or RunLogger()
    run_dir = Path(run_dir)
    started = time.time()
    validate(cfg)
    configured_quant = cfg.quant
    cfg, deployment = apply_target(cfg)
    runtime = setup_runtime(cfg.train.device)
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data, data_info = load_data(cfg, distributed=runtime.distributed)
    model = build_model(cfg.model.arch, width_mult=cfg.model.width_mult, num_classes=data_info["num_classes"],
                        resolution=cfg.model.resolution, weights=cfg.model.weights).to(runtime.device)
    device = runtime.device
    timings: dict[str, float] = {}

    t = time.time()
    float_source = float_weights(model, data, cfg, data_info, run_dir, tracker, runtime)
    timings["float_train_s"] = time.time() - t
    if not runtime.is_main:  # DDP: the other ranks only train; rank 0 evaluates, measures, writes the record
        if cfg.quant.precision != "float" and cfg.method == "qat":  # PTQ has no training to share
            quantize_and_finetune(model, data, cfg, run_dir, tracker, runtime)
        return {}
    float_logits, float_pred, targets = predict(model, data.val, desc="eval float", device=device)
    accuracy = {"float_top1": top1(float_pred, targets), "float_top5": top5(float_logits, targets)}
    log.info("[float] top-1 %.2f%%", accuracy["float_top1"])

    float_latency, host = measure_latency(cfg, engine="torch_eager", precision="float",
                                          num_classes=data_info["num_classes"])
    log.info("[latency] float %.3f ms (median, batch %d, %d thread(s))", float_latency["median_ms"],
             cfg.latency.batch, cfg.latency.threads)
    record: dict[str, Any] = {}
    if cfg.quant.precision == "float":
        accuracy["top1"], accuracy["top5"] = accuracy["float_top1"], accuracy["float_top5"]
        latency = float_latency
        quant = {"precision": "float", "weight_bits": 32, "act_bits": 32}
    else:
        q = cfg.quant
        t = time.time()
        if cfg.method == "ptq":  # post-training methods of cfg.ptq (qat.ptq) instead of QAT fine-tuning
            prepared, record["ptq"] = prepare_and_post_train(
                model, q, cfg.ptq, data_root=data_info["root"], resolution=cfg.model.resolution,
                batch_size=cfg.data.batch_size, resize_ratio=cfg.data.resize_ratio, seed=cfg.seed,
                workers=cfg.data.workers, device=device)
            timings["ptq_s"] = time.time() - t
        else:
            prepared = quantize_and_finetune(model, data, cfg, run_dir, tracker, runtime)
            timings["qat_train_s"] = time.time() - t
        with exact_float32():
            sim_logits, sim_pred, _ = predict(prepared, data.val, desc="eval simulated", device=device)
        accuracy["sim_top5"] = top5(sim_logits, targets)
        accuracy["sim_top1"] = top1(sim_pred, targets)
        log.info("[%s] simulated top-1 %.2f%%", cfg.method, accuracy["sim_top1"])
    reason, int_model = None, None
    if cfg.quant.precision != "float":
        int_model, reason = integer_form(prepared)
    status = "ok"
    if cfg.quant.precision != "float":
        calibration = cfg.ptq.calibration_batches if cfg.method == "ptq" else q.calibration_batches
        quant = quant_block(prepared, cfg, configured_quant, calibration)
        record["target"] = deployment.record()
    if reason is not None:  # e.g. two-tensor layers (Choukroun §3.3): simulated results only, no top1/top5
        status = "simulated_only"
        record["fidelity"] = {"integer_model": f"not convertible: {reason}"}
        latency = {"engine": "none (simulated only, no integer model)", "median_ms": None}
        record["latency_float"] = {"engine": "torch_eager", **float_latency}
        log.warning("[%s] no integer model: %s (the record has simulated accuracy only)", cfg.method, reason)
    elif int_model is not None:
        int_model.meta.update({"arch": cfg.model.arch, "width_mult": cfg.model.width_mult,
                               "resolution": cfg.model.resolution, "num_classes": data_info["num_classes"]})
        int_model.save(run_dir / "int_model.pt")
        latency, _ = measure_latency(cfg, engine=primary_int8_engine(cfg), precision="int8",
                                     int_model=run_dir / "int_model.pt")
        log.info("[latency] int8 %.3f ms (median)", latency["median_ms"])
        primary = primary_int8_engine(cfg)
        record["fidelity"], int_logits = evaluate_engines(int_model, data.val, sim_logits, sim_pred, targets,
                                                 cfg.latency.eval_engines, primary, cfg.latency.threads)
        accuracy["int_top1"] = accuracy["top1"] = record["fidelity"]["engines"][primary]["top1"]
        accuracy["int_top5"] = accuracy["top5"] = top5(int_logits, targets)
        log.info("[int8] %s top-1 %.2f%%  (agreement with simulated %.2f%%; lowest over engines %.2f%%)",
                 primary, accuracy["int_top1"], record["fidelity"]["sim_vs_int_top1_agreement"],
                 record["fidelity"]["min_agreement_with_sim"])
        if cfg.target.diagnostic_images > 0:
            record["saturation"] = saturation_block(int_model, (x for x, _ in data.val),
                                                    cfg.target.diagnostic_images, list(record["fidelity"]["engines"]))
        record["latency_float"] = {"engine": "torch_eager", **float_latency}

    record = {
        "run_id": f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
        "method": record_method(cfg.method, cfg.quant.precision, cfg.ptq),
        "model_id": model_id(cfg, float_source),
        "status": status,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "experiment": cfg.tag,
        "seed": cfg.seed,
        "model": {"arch": cfg.model.arch, "width_mult": cfg.model.width_mult, "resolution": cfg.model.resolution,
                  "num_classes": data_info["num_classes"], "params": sum(p.numel() for p in model.parameters()),
                  "macs": count_macs(model, cfg.model.resolution), "float_source": float_source},
        "data": data_info,
        "quant": quant,
        "schedule": asdict(cfg.schedule),
        "accuracy": accuracy,
        **record,
        "latency": latency,
        "host": host,
        "training": engine.describe(cfg.train, runtime, data.train),
        "timing": {**timings, "total_s": time.time() - started},
        "run_dir": str(run_dir.resolve()),
    }
    path = write_record(run_dir, record)
    tracker.log_metrics({metric_name(key): value for key, value in accuracy.items()})
    tracker.log_record(record)
    shown = (f"top-1 {accuracy['top1']:.2f}%" if "top1" in accuracy
             else f"simulated top-1 {accuracy['sim_top1']:.2f}% (no integer model)")
    log.info("[record] %s  %s  latency %s ms", path, shown,
             "n/a" if latency["median_ms"] is None else f"{latency['median_ms']:.3f}")
    return record
