"""One detection run, end to end, in the shape of the classification run (``qat.pipeline``):

data (COCO layout; synthetic set generated on first use) -> SSDLite -> float training or float weights ->
COCO mAP (float) -> prepare the core (backbone + heads) for simulated quantization -> calibrate -> QAT
fine-tune with the schedule -> mAP (simulated) -> convert the core to the canonical integer model ->
mAP on the int8 engine (post-processing in float around it) -> batch-1 latency of the whole detector,
float and int8 -> ``record.json`` with ``accuracy.map`` (Jacob et al. 2018 Table 4.4 layout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from qat.detection.config import DetectRunConfig
from qat.detection.data import CocoDetectionSet, CocoSplit, check_split, detection_loader, detection_transforms
from qat.detection.detector import SSDLiteDetector
from qat.detection.metric import METRICS
from qat.detection.models import BACKBONES, build_detector
from qat.detection.synthetic import make_synthetic_coco
from qat.detection.train import detection_task, evaluate
from qat.engines import registry
from qat.errors import QatError, choice_error
from qat.fidelity import check_engine_names, on_engines, output_lsb, primary_engine
from qat.intmodel.convert import convert
from qat.intmodel.graph import IntModel
from qat.latency.harness import measure
from qat.latency.host import describe_host
from qat.models.registry import count_macs
from qat.pipeline import PRECISIONS, seed_everything
from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare
from qat.record_blocks import quant_block
from qat.records import write_record
from qat.train import engine
from qat.train.checkpoint import reuse_or_train
from qat.train.distributed import Runtime
from qat.train.distributed import setup as setup_runtime

log = logging.getLogger("qat")

DATASETS = ("synthetic", "coco")


@dataclass
class DetectionData:
    train: DataLoader
    val: DataLoader
    val_split: CocoSplit
    info: dict[str, Any]


def validate(cfg: DetectRunConfig) -> None:
    """Cheap checks of every name before any work is done."""
    if cfg.model.backbone not in BACKBONES:
        raise choice_error("model.backbone", cfg.model.backbone, list(BACKBONES))
    if cfg.quant.precision not in PRECISIONS:
        raise choice_error("quant.precision", cfg.quant.precision, PRECISIONS)
    engine = registry.entry(engine_name(cfg))
    if cfg.quant.precision == "int8" and "int8" not in engine.precisions:
        raise QatError("latency.engine", f"engine {engine.name!r} has no int8 path",
                       f"it runs: {', '.join(engine.precisions)}; choose an int8 engine or quant=float")
    check_engine_names(cfg.latency.eval_engines)
    if cfg.data.name not in DATASETS:
        raise choice_error("data.name", cfg.data.name, DATASETS)
    if cfg.data.name == "coco" and not cfg.data.root:
        raise QatError("data.root", "is not set", "give the folder holding train2017/, val2017/, annotations/")


def engine_name(cfg: DetectRunConfig) -> str:
    """The engine registry's name: ``torch_native`` + ``latency.backend`` or a registry name as is."""
    return primary_engine(cfg.latency.engine, cfg.latency.backend)


def float_engine_name(cfg: DetectRunConfig) -> str:
    """The float baseline runs on the same engine when it has a float path, else PyTorch eager (BN folded)."""
    name = engine_name(cfg)
    return name if "float" in registry.entry(name).precisions else "torch_eager"


def cache_dir(cfg: DetectRunConfig) -> Path:
    from qat.data.synthetic import default_cache_dir

    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


def load_data(cfg: DetectRunConfig, distributed: bool = False) -> DetectionData:
    d = cfg.data
    if d.name == "synthetic":
        root = make_synthetic_coco(cache_dir(cfg) / "data", **asdict(d.synthetic))
    else:
        root = Path(str(d.root)).expanduser()
    train_split, val_split = check_split(root, d.train_split, keep_annotations=False), check_split(root, d.val_split)
    if train_split.category_ids != val_split.category_ids:
        raise QatError(str(val_split.annotation_file), "lists other categories than the training annotations",
                       f"use the same categories as {train_split.annotation_file}")
    res = cfg.model.resolution
    train_set = CocoDetectionSet(train_split, detection_transforms(res, True, d.hflip), d.max_train_images)
    val_set = CocoDetectionSet(val_split, detection_transforms(res, False), d.max_val_images)
    info = {"name": d.name, "root": str(root), "num_categories": val_split.num_categories,
            "categories": val_split.category_names, "train_size": len(train_set), "val_size": len(val_set)}
    return DetectionData(detection_loader(train_set, d.batch_size, True, d.workers, cfg.seed, distributed),
                         detection_loader(val_set, d.eval_batch_size, False, d.workers), val_split, info)


def float_key(cfg: DetectRunConfig, data_info: dict[str, Any]) -> str:
    """Identity of the float training recipe: same key, same float weights."""
    recipe = {"model": asdict(cfg.model), "data": {**asdict(cfg.data), "root": data_info["root"]},
              "optim": asdict(cfg.optim), "epochs": cfg.train.float_epochs, "seed": cfg.seed, "v": 1,
              "channels_last": cfg.train.channels_last}  # another summation order: other weights
    recipe["model"].pop("weights")
    return "det-" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def train_detector(detector: SSDLiteDetector, data: DetectionData, cfg: DetectRunConfig, runtime: Runtime, *,
                   phase: str, epochs: int, lr: float, checkpoint: Path,
                   before_step: Callable[[int], None] | None = None) -> SSDLiteDetector:
    """Detection on the training engine (:func:`qat.train.engine.fit`) on ``runtime.device``; the detector comes
    back on the CPU, where evaluation, conversion and latency run."""
    task = detection_task(data.val, data.val_split.coco, data.val_split.category_ids)
    engine.fit(detector.to(runtime.device), data.train, task, train=cfg.train, optim=cfg.optim, seed=cfg.seed,
               phase=phase, epochs=epochs, lr=lr, checkpoint=checkpoint, before_step=before_step, runtime=runtime)
    return detector.cpu()


def float_weights(detector: SSDLiteDetector, data: DetectionData, cfg: DetectRunConfig, run_dir: Path,
                  runtime: Runtime) -> str:
    """Load or train the float weights; return where they came from."""
    if cfg.model.weights:
        return f"file:{cfg.model.weights}"  # loaded by build_detector
    return reuse_or_train(
        detector, cache_dir(cfg) / "float" / f"{float_key(cfg, data.info)}.pt", enabled=cfg.train.cache_float,
        write=runtime.is_main,
        train=lambda: train_detector(detector, data, cfg, runtime, phase="float", epochs=cfg.train.float_epochs,
                                     lr=cfg.optim.lr, checkpoint=run_dir / "checkpoints" / "float_last.pt"))


def detector_latency(detector: SSDLiteDetector, cfg: DetectRunConfig) -> dict[str, Any]:
    """Batch latency of the whole detector: resize/normalise, core, anchors, decoding and NMS."""
    lat = cfg.latency
    res = cfg.model.resolution
    example = torch.rand(lat.batch, 3, res, res, generator=torch.Generator().manual_seed(0))
    detector.eval()
    stats = measure(lambda x: detector(list(x)), example, threads=lat.threads, warmup=lat.warmup,
                    repeats=lat.repeats, min_time_s=lat.min_time_s)
    return {**stats.as_dict(), "device": "cpu", "scope": "detector (core + float post-processing)"}


def core_latency(core: nn.Module | registry.Engine, cfg: DetectRunConfig) -> float:
    """Median batch latency (ms) of the core alone (backbone + heads, no post-processing)."""
    lat, res = cfg.latency, cfg.model.resolution
    example = torch.rand(lat.batch, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return measure(core, example, threads=lat.threads, warmup=lat.warmup, repeats=lat.repeats,
                   min_time_s=lat.min_time_s).median_ms


def _with_core(detector: SSDLiteDetector, core: nn.Module | registry.Engine) -> SSDLiteDetector:
    return SSDLiteDetector(core, detector.shell, detector.level_shapes, detector.anchors_per_location,
                           detector.num_classes)


def _map_fields(prefix: str, result: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{name}": result[name] for name in METRICS}


def model_id(cfg: DetectRunConfig, float_source: str) -> str:
    q = cfg.quant
    blob = json.dumps({"model": asdict(cfg.model), "quant": asdict(q), "schedule": asdict(cfg.schedule),
                       "train": asdict(cfg.train), "data": cfg.data.name, "seed": cfg.seed,
                       "float": float_source}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:8]
    tag = "float" if q.precision == "float" else f"w{q.weight_bits}a{q.act_bits}"
    return f"ssdlite_{cfg.model.backbone}-w{cfg.model.width_mult:g}-r{cfg.model.resolution}-{tag}-{digest}"


def quantize_and_finetune(detector: SSDLiteDetector, data: DetectionData, cfg: DetectRunConfig, run_dir: Path,
                          runtime: Runtime) -> tuple[nn.Module, SSDLiteDetector]:
    """Prepare simulated quantization of the core, calibrate it, QAT fine-tune the detector with the schedule;
    return (prepared core, detector around it), on the CPU."""
    q, res = cfg.quant, cfg.model.resolution
    qconfig = QuantConfig(**{k: v for k, v in asdict(q).items() if k not in ("precision", "calibration_batches")})
    prepared = prepare(detector.core, qconfig, torch.zeros(1, 3, res, res))
    qdet = _with_core(detector, prepared)
    with calibration_mode(prepared), torch.no_grad():
        for i, (images, _) in enumerate(data.train):
            if i >= q.calibration_batches:
                break
            prepared(qdet.shell.transform(images)[0].tensors)
    sched = cfg.schedule
    train_detector(qdet, data, cfg, runtime, phase="qat", epochs=cfg.train.qat_epochs, lr=cfg.train.qat_lr,
                   checkpoint=run_dir / "checkpoints" / "qat_last.pt",
                   before_step=lambda step: sched.apply(prepared, step))
    sched.apply(prepared, cfg.train.qat_epochs * len(data.train))
    return prepared, qdet


def run_detection(cfg: DetectRunConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run the whole detection pipeline for one config and write ``<run_dir>/record.json``; return it. Under DDP
    (torchrun, SLURM tasks) every rank trains its shard and only rank 0 evaluates and writes (the others get
    ``{}``)."""
    run_dir = Path(run_dir)
    started = time.time()
    validate(cfg)
    runtime = setup_runtime(cfg.train.device)
    seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = load_data(cfg, distributed=runtime.distributed)
    m = cfg.model
    detector = build_detector(m.backbone, num_categories=data.info["num_categories"], width_mult=m.width_mult,
                              resolution=m.resolution, weights=m.weights, backbone_weights=m.backbone_weights)
    annotations, category_ids = data.val_split.coco, data.val_split.category_ids
    timings: dict[str, float] = {}

    t = time.time()
    float_source = float_weights(detector, data, cfg, run_dir, runtime)
    timings["float_train_s"] = time.time() - t
    if not runtime.is_main:  # DDP: the other ranks only train; rank 0 evaluates, measures, writes the record
        if cfg.quant.precision != "float":
            quantize_and_finetune(detector, data, cfg, run_dir, runtime)
        return {}
    float_result = evaluate(detector, data.val, annotations, category_ids, desc="eval float")
    accuracy: dict[str, Any] = _map_fields("float_", float_result)
    log.info("[float] mAP %.2f  AP50 %.2f", float_result["map"], float_result["map_50"])
    res, lat = m.resolution, cfg.latency
    float_engine = registry.build_float(float_engine_name(cfg), detector.core, torch.zeros(lat.batch, 3, res, res),
                                        lat.threads)
    float_latency = {**registry.engine_info(float_engine_name(cfg)),
                     **detector_latency(_with_core(detector, float_engine), cfg),
                     "core_median_ms": core_latency(float_engine, cfg)}
    log.info("[latency] float detector %.3f ms, core %.3f ms (median, batch %d)", float_latency["median_ms"],
             float_latency["core_median_ms"], cfg.latency.batch)
    record: dict[str, Any] = {}
    if cfg.quant.precision == "float":
        accuracy.update(_map_fields("", float_result))
        latency = float_latency
        quant: dict[str, Any] = {"precision": "float", "weight_bits": 32, "act_bits": 32}
    else:
        t = time.time()
        prepared, qdet = quantize_and_finetune(detector, data, cfg, run_dir, runtime)
        timings["qat_train_s"] = time.time() - t
        sim_result = evaluate(qdet, data.val, annotations, category_ids, desc="eval simulated")
        accuracy.update(_map_fields("sim_", sim_result))
        log.info("[qat] simulated mAP %.2f", sim_result["map"])

        int_model = convert(prepared)  # raises a one-line QatError for ops the integer model lacks
        int_model.meta.update({"task": "detection", "backbone": m.backbone, "width_mult": m.width_mult,
                               "resolution": res, "num_classes": detector.num_classes,
                               "level_shapes": detector.level_shapes,
                               "anchors_per_location": detector.anchors_per_location})
        int_model.save(run_dir / "int_model.pt")
        # latency first, on a fresh engine (see qat.pipeline: the x86 backend slows down after big batches)
        name = engine_name(cfg)
        int_engine = registry.build_int(name, int_model, lat.threads)
        latency = {**registry.engine_info(name), **detector_latency(_with_core(detector, int_engine), cfg),
                   "core_median_ms": core_latency(int_engine, cfg)}
        log.info("[latency] int8 detector %.3f ms, core %.3f ms (median, %s)", latency["median_ms"],
                 latency["core_median_ms"], name)
        record["fidelity"], int_result = engine_fidelity(int_model, prepared, detector, data,
                                                         [name, *cfg.latency.eval_engines], lat.threads)
        accuracy.update(_map_fields("int_", int_result))
        accuracy.update(_map_fields("", int_result))
        log.info("[int8] %s mAP %.2f (simulated %.2f)", name, int_result["map"], sim_result["map"])
        quant = quant_block(prepared, cfg, cfg.quant, cfg.quant.calibration_batches)  # read back from the model
        record["latency_float"] = float_latency
        record["coco_summary_simulated"] = sim_result["summary"]

    record = {
        "run_id": f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
        "model_id": model_id(cfg, float_source),
        "status": "ok",
        "task": "detection",
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "experiment": cfg.tag,
        "seed": cfg.seed,
        "model": {"arch": f"ssdlite_{m.backbone}", "backbone": m.backbone, "width_mult": m.width_mult,
                  "resolution": m.resolution, "num_classes": detector.num_classes,
                  "params": sum(p.numel() for p in detector.parameters()),
                  "macs": count_macs(detector.core, m.resolution), "float_source": float_source},
        "data": data.info,
        "quant": quant,
        "schedule": asdict(cfg.schedule),
        "accuracy": accuracy,
        "coco_summary": (float_result if cfg.quant.precision == "float" else int_result)["summary"],
        **record,
        "latency": latency,
        "host": describe_host(),
        "training": engine.describe(cfg.train, runtime, data.train),
        "timing": {**timings, "total_s": time.time() - started},
        "run_dir": str(run_dir.resolve()),
    }
    path = write_record(run_dir, record)
    log.info("[record] %s  mAP %.2f  latency %.3f ms", path, accuracy["map"], latency["median_ms"])
    return record


def engine_fidelity(int_model: IntModel, prepared: nn.Module, detector: SSDLiteDetector, data: DetectionData,
                    names: list[str], threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """COCO mAP of the integer detector on every engine of ``names`` (the first is the primary one and must
    run), and each engine's core outputs against the simulated core on the first validation batch, in
    output LSBs. An engine that cannot run the core is recorded as unsupported with its one-line reason.
    Returns the record's fidelity block and the primary engine's COCO result."""
    lsb = output_lsb(int_model)
    images, _ = next(iter(data.val))
    x = detector.shell.transform(images)[0].tensors
    prepared.eval()
    with torch.no_grad():
        simulated = prepared(x)
    primary = names[0]
    results: dict[str, dict[str, Any]] = {}

    def run(name: str, engine: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        with torch.no_grad():
            diff = (engine(x) - simulated).abs() / lsb
        results[name] = evaluate(_with_core(detector, engine), data.val, data.val_split.coco,
                                 data.val_split.category_ids, desc=f"eval {name}")
        log.info("[fidelity] %-20s mAP %.2f  core max |Δ| %.1f LSB, mean %.3f LSB", name, results[name]["map"],
                 float(diff.max()), float(diff.mean()))
        return {**_map_fields("", results[name]), "core_max_abs_diff_lsb": float(diff.max()),
                "core_mean_abs_diff_lsb": float(diff.mean()),
                "core_within_1lsb": float((diff <= 1 + 1e-3).float().mean() * 100)}

    engines = on_engines(int_model, names, primary, threads, run)
    main = engines[primary]
    block = {"primary_engine": primary, "output_lsb": lsb, "engines": engines,
             "core_max_abs_diff_lsb": main["core_max_abs_diff_lsb"],
             "core_mean_abs_diff_lsb": main["core_mean_abs_diff_lsb"],
             "engine_8bit_container": bool(main.get("emulated_bits", False))}
    return block, results[primary]
