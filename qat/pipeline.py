"""One run, end to end, for every task (the spine of the framework; the task seam is :mod:`qat.task`):

data -> model -> float weights (train or reuse) -> evaluate float -> float latency -> prepare the core for
simulated quantization -> calibrate -> QAT fine-tuning with the schedule, or the PTQ methods -> evaluate
simulated -> convert the core to the canonical integer model -> every engine's fidelity -> int8 latency ->
one record. Latency is measured in fresh subprocesses (:mod:`qat.latency.subprocess`). Classification
(:mod:`qat.classification`) and detection (:mod:`qat.detection.task`) differ only in what the task supplies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
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
from qat.classification import CLASSIFICATION, cache_dir, load_data
from qat.engines import registry
from qat.errors import NoIntegerForm, QatError, choice_error
from qat.fidelity import check_engine_names, eval_device, primary_engine
from qat.intmodel.convert import convert
from qat.intmodel.graph import IntModel
from qat.latency.subprocess import MeasureSpec, measure_in_subprocess
from qat.ptq.apply import run_ptq
from qat.ptq.driver import check_method, not_convertible_reason, quant_config, record_method
from qat.quant import cpu_kernel, range_sync
from qat.quant.lsq import LSQ_NAMES
from qat.quant.prepare import calibration_mode, prepare
from qat.quant.schedule import batch_norms_without_statistics
from qat.record_blocks import apply_target, quant_block, saturation_block
from qat.records import write_record
from qat.task import Evaluation, RunTask, TaskData
from qat.tracking import RunLogger
from qat.train import engine
from qat.train.checkpoint import reuse_or_train
from qat.train.distributed import Runtime, exact_float32
from qat.train.distributed import setup as setup_runtime

log = logging.getLogger("qat")

PRECISIONS = ("float", "int8")
# latency.engine: torch_native (with latency.backend) or any int8 engine of the registry
ENGINES = ("auto", "torch_native", *[name for name, e in registry.ENGINES.items() if "int8" in e.precisions])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def validate(cfg: Any, task: RunTask = CLASSIFICATION) -> None:
    """Cheap checks of every name and path before any work is done."""
    task.validate(cfg)
    if cfg.quant.precision not in PRECISIONS:
        raise choice_error("quant.precision", cfg.quant.precision, PRECISIONS)
    check_method(cfg.method)
    check_learned_steps(cfg)
    if cfg.latency.engine not in ENGINES:
        raise choice_error("latency.engine", cfg.latency.engine, ENGINES)
    check_engine_names(cfg.latency.eval_engines)
    eval_device(cfg.latency.eval_device, torch.device("cpu"))  # a known name; cuda only where one is visible
    engine.check_compile_mode(cfg.train.compile_mode)
    deployment, _ = targets.plan(cfg.target.name, cfg.quant, cfg.target.avx2_grid)  # refuses what cannot run
    kernel = cpu_kernel.choice()  # a bad QAT_CPU_KERNEL stops every run
    if cfg.quant.precision != "float":
        targets.check_installed(deployment.target, [primary_int8_engine(cfg)])
        if kernel == "fused":  # asked for: fail now, before any training, if it cannot be built
            cpu_kernel.ops()


def check_learned_steps(cfg: Any) -> None:
    """Learned step sizes (:mod:`qat.quant.lsq`) are trained by QAT and initialised by its calibration."""
    q = cfg.quant
    learned = [key for key in ("act_observer", "weight_observer") if getattr(q, key) in LSQ_NAMES]
    if not learned or q.precision == "float":
        return
    key = f"quant.{learned[0]}"
    if cfg.method != "qat":
        raise QatError(key, f"{getattr(q, learned[0])} learns its step size during QAT, and method={cfg.method} "
                       "does not train", "use method=qat, or a range observer (minmax, mse) for PTQ")
    if q.calibration_batches < 1:
        raise QatError("quant.calibration_batches", f"{q.calibration_batches} leaves the learned step sizes of "
                       f"{key} uninitialised before training", "calibrate on at least 1 batch (default 4)")


def float_key(cfg: Any, data_info: dict[str, Any], task: RunTask = CLASSIFICATION) -> str:
    """Identity of the float training recipe: same key, same float weights."""
    recipe = {"model": asdict(cfg.model), "data": {**asdict(cfg.data), "root": data_info["root"]},
              "optim": asdict(cfg.optim), "epochs": cfg.train.float_epochs, "seed": cfg.seed, "v": 1,
              "channels_last": cfg.train.channels_last}  # another summation order: other weights
    recipe["model"].pop("weights")
    if recipe["model"].get("bn_momentum") is None:  # the architecture's own: the same key as before the setting
        recipe["model"].pop("bn_momentum", None)
    for key in ("val_max_images", "val_subset_seed"):  # evaluation only: the same float weights
        recipe["data"].pop(key, None)
    return task.float_key_prefix + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def fit(model: nn.Module, data: TaskData, cfg: Any, *, phase: str, epochs: int, lr: float, checkpoint: Path,
        task: RunTask = CLASSIFICATION, before_step=None, tracker: RunLogger | None = None,  # type: ignore[no-untyped-def]
        runtime: Runtime | None = None) -> nn.Module:
    """``task``'s loss and validation metric on the training engine (:func:`qat.train.engine.fit`)."""
    runtime = runtime or Runtime()
    return engine.fit(model, data.train, task.train_task(data, runtime), train=cfg.train, optim=cfg.optim,
                      seed=cfg.seed, phase=phase, epochs=epochs, lr=lr, checkpoint=checkpoint,
                      before_step=before_step, tracker=tracker, runtime=runtime)


def float_weights(model: nn.Module, data: TaskData, cfg: Any, run_dir: Path, task: RunTask = CLASSIFICATION,
                  tracker: RunLogger | None = None, runtime: Runtime | None = None) -> str:
    """Load or train the float weights; return where they came from."""
    if cfg.model.weights:
        return f"file:{cfg.model.weights}"  # loaded when the model was built
    return reuse_or_train(
        model, cache_dir(cfg) / "float" / f"{float_key(cfg, data.info, task)}.pt", enabled=cfg.train.cache_float,
        write=runtime is None or runtime.is_main,
        train=lambda: fit(model, data, cfg, phase="float", epochs=cfg.train.float_epochs, lr=cfg.optim.lr,
                          checkpoint=run_dir / "checkpoints" / "float_last.pt", task=task, tracker=tracker,
                          runtime=runtime))


def measure_latency(cfg: Any, *, engine: str, precision: str, model_fields: dict[str, Any],
                    int_model: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latency of the run's float or int8 model measured in a fresh subprocess with fixed threads and CPU
    affinity (:mod:`qat.latency.subprocess`); returns (latency block, host description of the measuring
    process). ``model_fields`` (the task's :meth:`~qat.task.RunTask.latency_model`) build the model there."""
    lat = cfg.latency
    spec = MeasureSpec(engine=engine, precision=precision, int_model=str(int_model) if int_model else None,
                       batch=lat.batch, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats,
                       min_time_s=lat.min_time_s, seed=cfg.seed, **model_fields)
    result = measure_in_subprocess(spec)
    block = {**result["engine"], **result["stats"], **result.get("scopes", {}), "device": "cpu",
             "threads_in_child": result["child"]}
    return block, result["host"]


def model_id(cfg: Any, float_source: str, task: RunTask = CLASSIFICATION) -> str:
    q = cfg.quant
    blob = json.dumps({"model": asdict(cfg.model), "quant": asdict(q), "schedule": asdict(cfg.schedule),
                       "train": asdict(cfg.train), "data": cfg.data.name, "seed": cfg.seed,
                       "float": float_source, **({"ptq": asdict(cfg.ptq)} if cfg.method == "ptq" else {})},
                      sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    tag = "float" if q.precision == "float" else f"w{q.weight_bits}a{q.act_bits}"
    return f"{task.model_name(cfg)}-w{cfg.model.width_mult:g}-r{cfg.model.resolution}-{tag}-{digest}"


def metric_name(key: str) -> str:
    """Tracker name of an accuracy key: top1, top1/float, top1/sim, top1/int, map, map/float, map_50/sim, ..."""
    for stage in ("float", "sim", "int"):
        if key.startswith(f"{stage}_"):
            return f"{key[len(stage) + 1:]}/{stage}"
    return key


def primary_int8_engine(cfg: Any) -> str:
    """The engine whose int8 accuracy is the run's accuracy (the latency engine)."""
    return primary_engine(cfg.latency.engine, cfg.latency.backend, cfg.target.name)


def quantize_and_finetune(model: nn.Module, data: TaskData, cfg: Any, run_dir: Path, tracker: RunLogger | None,
                          runtime: Runtime, task: RunTask = CLASSIFICATION) -> nn.Module:
    """Prepare simulated quantization of the task's core, calibrate its ranges, then QAT fine-tuning of the whole
    model with the schedule; returns the prepared core (inside the model the task rebuilt around it)."""
    q = cfg.quant
    prepared = prepare_core(model, cfg, runtime.device, task)
    check_batch_norm_statistics(prepared, cfg)
    quantized = task.with_core(model, prepared)
    # calibration batches depend on the seed alone, not on what ran before: a resumed run skips float training
    torch.manual_seed(cfg.seed)
    if getattr(data.train, "generator", None) is not None:
        data.train.generator.manual_seed(cfg.seed)
    # under DDP every rank calibrates on its shard and the ranges combine across ranks (qat.quant.range_sync):
    # the calibrated ranges are those of one process on the global batches
    with calibration_mode(prepared), torch.no_grad(), range_sync.synchronized():
        for i, (images, _) in enumerate(data.train):
            if i >= q.calibration_batches:
                break
            prepared(task.core_input(quantized, images, runtime.device))
    sched = cfg.schedule
    fit(quantized, data, cfg, phase="qat", epochs=cfg.train.qat_epochs, lr=cfg.train.qat_lr,
        checkpoint=run_dir / "checkpoints" / "qat_last.pt", task=task,
        before_step=lambda step: sched.apply(prepared, step), tracker=tracker, runtime=runtime)
    sched.apply(prepared, cfg.train.qat_epochs * len(data.train))
    return prepared


def check_batch_norm_statistics(prepared: nn.Module, cfg: Any) -> None:
    """Refuse to fold batch norms frozen from the first QAT step (``schedule.bn_freeze_step=0``) with running
    statistics that never saw data: their layers would not train (:func:`batch_norms_without_statistics`)."""
    if cfg.schedule.bn_freeze_step != 0 or cfg.train.qat_epochs == 0:
        return
    unseen = batch_norms_without_statistics(prepared)
    if unseen:
        raise QatError("schedule.bn_freeze_step", f"0 folds {len(unseen)} batch norms (first: {unseen[0]}) with "
                       "running statistics that never saw data (mean 0, variance 1), so their layers would not "
                       "train", "train float first (train.float_epochs > 0), load trained weights (model.weights), "
                       "or let QAT start on batch statistics (schedule.bn_freeze_step=200, or null)")


def prepare_core(model: nn.Module, cfg: Any, device: torch.device, task: RunTask) -> nn.Module:
    """The task's core prepared for simulated quantization with ``cfg.quant`` (a copy; the float model is
    unchanged), traced at the model's input resolution."""
    example = torch.zeros(1, 3, cfg.model.resolution, cfg.model.resolution, device=device)
    return prepare(task.core(model), quant_config(cfg.quant), example)


def post_train(model: nn.Module, data: TaskData, cfg: Any, device: torch.device, task: RunTask = CLASSIFICATION
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Prepare simulated quantization of the task's core (a copy; the float model is unchanged) and run the
    ``ptq`` methods (:func:`qat.ptq.apply.run_ptq`) on training images seen through the evaluation transform;
    returns the prepared core and the methods' report."""
    prepared = prepare_core(model, cfg, device, task)
    return prepared, run_ptq(prepared, task.calibration_batches(cfg, data, model, device), cfg.ptq)


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


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def run(cfg: Any, run_dir: str | Path, task: RunTask = CLASSIFICATION, tracker: RunLogger | None = None
        ) -> dict[str, Any]:
    """Run the whole pipeline for one config of ``task`` and write ``<run_dir>/record.json``; return the record.
    ``tracker`` (qat.tracking) receives per-step training metrics, the accuracies and the record. Under DDP
    (torchrun, SLURM tasks) every rank trains its shard and only rank 0 evaluates, measures and writes (the
    others return ``{}``)."""
    tracker = tracker or RunLogger()
    run_dir = Path(run_dir)
    started = time.time()
    validate(cfg, task)
    configured_quant = cfg.quant
    cfg, deployment = apply_target(cfg)
    runtime = setup_runtime(cfg.train.device)
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = task.load_data(cfg, distributed=runtime.distributed)
    model = task.build_model(cfg, data).to(runtime.device)
    device = runtime.device
    timings: dict[str, float] = {}
    int8 = cfg.quant.precision != "float"

    t = time.time()
    float_source = float_weights(model, data, cfg, run_dir, task, tracker, runtime)
    timings["float_train_s"] = time.time() - t
    if not runtime.is_main:  # DDP: the other ranks only train; rank 0 evaluates, measures, writes the record
        if int8 and cfg.method == "qat":  # PTQ has no training to share
            quantize_and_finetune(model, data, cfg, run_dir, tracker, runtime, task)
        return {}
    float_eval = task.evaluate(model, data, "eval float", device)
    accuracy: dict[str, Any] = _prefixed("float_", float_eval.metrics)
    log.info("[float] %s", task.headline(float_eval.metrics))
    primary = primary_int8_engine(cfg)
    with tempfile.TemporaryDirectory(prefix="qat-latency-") as scratch:
        float_fields = task.latency_model(cfg, data, model, Path(scratch))
        float_latency, host = measure_latency(cfg, engine=task.float_latency_engine(cfg, primary),
                                              precision="float", model_fields=float_fields)
    log.info("[latency] float %.3f ms (median, batch %d, %d thread(s), %s)", float_latency["median_ms"],
             cfg.latency.batch, cfg.latency.threads, float_latency["engine"])
    record: dict[str, Any] = {}
    final: Evaluation = float_eval
    status = "ok"
    if not int8:
        accuracy.update(float_eval.metrics)
        latency = float_latency
        quant: dict[str, Any] = {"precision": "float", "weight_bits": 32, "act_bits": 32}
    else:
        t = time.time()
        if cfg.method == "ptq":  # post-training methods of cfg.ptq (qat.ptq) instead of QAT fine-tuning
            prepared, record["ptq"] = post_train(model, data, cfg, device, task)
            timings["ptq_s"] = time.time() - t
        else:
            prepared = quantize_and_finetune(model, data, cfg, run_dir, tracker, runtime, task)
            timings["qat_train_s"] = time.time() - t
        with exact_float32():
            simulated = task.evaluate(task.with_core(model, prepared), data, "eval simulated", device)
        accuracy.update(_prefixed("sim_", simulated.metrics))
        log.info("[%s] simulated %s", cfg.method, task.headline(simulated.metrics))
        final = simulated
        int_model, reason = integer_form(prepared)
        calibration = cfg.ptq.calibration_batches if cfg.method == "ptq" else cfg.quant.calibration_batches
        quant = quant_block(prepared, cfg, configured_quant, calibration)  # read back from the evaluated model
        record["target"] = deployment.record()
        record["latency_float"] = float_latency
        if int_model is None:  # e.g. two-tensor layers (Choukroun §3.3): simulated results only, no top-level
            status = "simulated_only"
            record["fidelity"] = {"integer_model": f"not convertible: {reason}"}
            latency = {"engine": "none (simulated only, no integer model)", "median_ms": None}
            log.warning("[%s] no integer model: %s (the record has simulated accuracy only)", cfg.method, reason)
        else:
            model = model.cpu()
            int_model.meta.update({"task": task.name, **task.int_meta(cfg, model, data)})
            int_model.save(run_dir / "int_model.pt")
            latency, _ = measure_latency(cfg, engine=primary, precision="int8", int_model=run_dir / "int_model.pt",
                                         model_fields=task.latency_model(cfg, data, model, None))
            log.info("[latency] int8 %.3f ms (median, %s)", latency["median_ms"], primary)
            record["fidelity"], final = task.fidelity(int_model, prepared, model, data, simulated,
                                                      list(cfg.latency.eval_engines), primary, cfg.latency.threads,
                                                      eval_device(cfg.latency.eval_device, device))
            accuracy.update(_prefixed("int_", final.metrics))
            accuracy.update(final.metrics)
            if cfg.target.diagnostic_images > 0:
                cpu = torch.device("cpu")
                record["saturation"] = saturation_block(
                    int_model, (task.core_input(model, x, cpu) for x, _ in data.val), cfg.target.diagnostic_images,
                    list(record["fidelity"]["engines"]))

    record = {
        "run_id": f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
        "method": record_method(cfg.method, cfg.quant.precision, cfg.ptq),
        "model_id": model_id(cfg, float_source, task),
        "status": status,
        "task": task.name,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "experiment": cfg.tag,
        "seed": cfg.seed,
        "model": task.record_model(cfg, model, data, float_source),
        "data": data.info,
        "quant": quant,
        "schedule": asdict(cfg.schedule),
        "accuracy": accuracy,
        **final.record,
        **({f"{key}_simulated": value for key, value in simulated.record.items()} if int8 and final is not simulated
           else {}),
        **record,
        "latency": latency,
        "host": host,
        "training": {**engine.describe(cfg.train, runtime, data.train),
                     **(cpu_kernel.describe() if int8 and runtime.device.type == "cpu" else {})},
        "timing": {**timings, "total_s": time.time() - started},
        "run_dir": str(run_dir.resolve()),
    }
    path = write_record(run_dir, record)
    # a COCO size bucket without objects has no AP (None): nothing to track
    tracker.log_metrics({metric_name(key): value for key, value in accuracy.items() if value is not None})
    tracker.log_record(record)
    shown = (task.headline(final.metrics) if task.objective in accuracy
             else f"simulated {task.headline(final.metrics)} (no integer model)")
    log.info("[record] %s  %s  latency %s ms", path, shown,
             "n/a" if latency["median_ms"] is None else f"{latency['median_ms']:.3f}")
    return record


def run_classification(cfg: Any, run_dir: str | Path, tracker: RunLogger | None = None) -> dict[str, Any]:
    """:func:`run` with the classification task."""
    return run(cfg, run_dir, CLASSIFICATION, tracker)


__all__ = ["ENGINES", "PRECISIONS", "cache_dir", "fit", "float_key", "float_weights", "integer_form", "load_data",
           "measure_latency", "metric_name", "model_id", "post_train", "prepare_core", "primary_int8_engine",
           "quantize_and_finetune", "run", "run_classification", "seed_everything", "validate"]
