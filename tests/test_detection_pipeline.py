"""A few-step detection run on the synthetic set: float -> QAT -> integer core on torch_native -> record."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import for_this_host

from qat.detection.config import (
    DetectDataConfig,
    DetectModelConfig,
    DetectRunConfig,
    DetectTrainConfig,
    SyntheticCocoConfig,
)
from qat.detection.models import build_detector
from qat.detection.task import DETECTION
from qat.engines.torch_native import build
from qat.errors import QatError
from qat.intmodel.convert import convert
from qat.intmodel.graph import IntModel
from qat.pipeline import run
from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare
from qat.schema import LatencyConfig
from qat.train.checkpoint import load_checkpoint
from qat.train.engine import CPU_AUTOCAST_NCHW
from qat.train.loop import OptimConfig

ROOT = Path(__file__).resolve().parents[1]
# stated tolerance: the int8 detector's COCO mAP within 5 points of the simulated detector's
MAP_TOLERANCE = 5.0


def run_detection(cfg: DetectRunConfig, run_dir: Path) -> dict:
    """The one run pipeline with the detection task."""
    return run(cfg, run_dir, DETECTION)


def tiny_config(tmp_path: Path) -> DetectRunConfig:
    return DetectRunConfig(
        cache_dir=str(tmp_path / "cache"), model=DetectModelConfig(width_mult=0.35, resolution=64),
        data=DetectDataConfig(batch_size=8, eval_batch_size=8, synthetic=SyntheticCocoConfig(
            train_images=16, val_images=8, image_size=64, num_categories=3)),
        optim=OptimConfig(name="adamw", lr=0.003), train=DetectTrainConfig(float_epochs=1, qat_epochs=1, threads=1),
        latency=LatencyConfig(repeats=3, warmup=1, min_time_s=0.0))


def test_few_step_qat_run_writes_record_with_map_and_integer_core(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    run_detection(tiny_config(tmp_path), run_dir)
    record = json.loads((run_dir / "record.json").read_text())
    assert record["schema"] == "qat.record/1" and record["task"] == "detection"
    acc = record["accuracy"]
    for key in ("map", "map_50", "float_map", "sim_map", "int_map"):
        assert 0.0 <= acc[key] <= 100.0, key
    assert acc["map"] == acc["int_map"]
    assert abs(acc["int_map"] - acc["sim_map"]) <= MAP_TOLERANCE
    assert record["quant"]["precision"] == "int8" and record["model"]["arch"] == "ssdlite_mobilenet_v2"
    # read back from the evaluated core's quantizers, not copied from the config
    # (7-bit weights where target=auto chose x86_avx2: an x86 host without VNNI)
    expected_bits = for_this_host(QuantConfig()).weight_bits
    assert record["quant"]["weight_bits"] == expected_bits and record["quant"]["act_observer"] == "ema"
    differences = {} if expected_bits == 8 else {"weight_bits": {"config": 8, "ran": expected_bits}}
    assert record["quant"]["weight_quantizers"] > 10 and record["quant"]["config_differences"] == differences
    assert record["latency"]["engine"] == "torch_native_x86" and record["latency"]["median_ms"] > 0
    assert record["latency_float"]["median_ms"] > 0 and record["latency"]["core_median_ms"] > 0
    fidelity = record["fidelity"]
    assert fidelity["core_mean_abs_diff_lsb"] < 0.5 and fidelity["core_max_abs_diff_lsb"] <= 16
    assert fidelity["primary_engine"] == "torch_native_x86"
    for name in ("torch_native_x86", "reference", "onnxruntime"):  # latency.eval_engines' defaults
        engine = fidelity["engines"][name]
        assert engine["status"] == "ok" and abs(engine["map"] - acc["sim_map"]) <= MAP_TOLERANCE, name
        assert engine["core_mean_abs_diff_lsb"] < 0.5, name
    int_model = IntModel.load(run_dir / "int_model.pt")
    assert int_model.meta["task"] == "detection"
    flat = build(int_model)(torch.zeros(2, 3, 64, 64))
    anchors = sum(a * h * w for a, (h, w) in zip(int_model.meta["anchors_per_location"],
                                                 int_model.meta["level_shapes"], strict=True))
    assert flat.shape == (2, anchors * (int_model.meta["num_classes"] + 4))


def test_mobilenet_v3_core_converts_with_hardswish_and_squeeze_excite() -> None:
    """The SSDLite v3-large core has an integer form (issue 18): hardswish, the SE gates and products convert,
    and the integer-only reference runs it close to the simulation (random weights: a few output LSB)."""
    from qat.intmodel.reference import ReferenceExecutor

    torch.set_num_threads(1)
    detector = build_detector("mobilenet_v3_large", num_categories=2, width_mult=0.35, resolution=64)
    prepared = prepare(detector.core, QuantConfig(), torch.zeros(1, 3, 64, 64))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with calibration_mode(prepared), torch.no_grad():
        prepared(x)
    int_model = convert(prepared.eval())
    ops = [n.op for n in int_model.nodes]
    assert ops.count("hardswish") > 0 and ops.count("hardsigmoid") == ops.count("mul") > 0
    out = int_model.node(int_model.nodes[-1].inputs[0]).out
    with torch.no_grad():
        simulated = prepared(x)
    lsb = (ReferenceExecutor(int_model)(x) - simulated).abs() / out.scale
    assert lsb.shape == simulated.shape and float(lsb.mean()) < 2.0, float(lsb.mean())


def _compose(overrides: list[str]) -> DetectRunConfig:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT / "experiments"))
    import detect  # noqa: F401 - registers the detect_schema

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="detect", overrides=overrides))


@pytest.mark.parametrize(("experiment", "backbone", "data"), [
    ("detect_demo", "mobilenet_v2", "synthetic"),
    ("jacob2018_table4_4", "mobilenet_v1", "coco"),
    ("jacob2018_table4_4_synthetic", "mobilenet_v1", "synthetic"),
])
def test_presets_compose_to_typed_configs(experiment: str, backbone: str, data: str) -> None:
    cfg = _compose([f"experiment={experiment}"])
    assert isinstance(cfg, DetectRunConfig)
    assert (cfg.model.backbone, cfg.data.name, cfg.quant.precision) == (backbone, data, "int8")


def test_float_run_records_float_map_and_eager_latency(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    cfg.quant.precision = "float"
    record = run_detection(cfg, tmp_path / "run")
    assert record["accuracy"]["map"] == record["accuracy"]["float_map"] and "sim_map" not in record["accuracy"]
    assert record["latency"]["engine"] == "torch_eager" and record["quant"]["precision"] == "float"
    assert not (tmp_path / "run" / "int_model.pt").exists()


@pytest.mark.parametrize(("overrides", "key"), [
    (["experiment=detect_demo", "model.backbone=resnet9000"], "model.backbone: unknown value 'resnet9000'"),
    (["experiment=jacob2018_table4_4"], "data.root: is not set"),
    (["experiment=detect_demo", "detect/data=coco", "data.root=/no/such/coco"], "data.root: /no/such/coco is not"),
])
def test_bad_input_stops_before_work_with_one_line(overrides: list[str], key: str, tmp_path: Path) -> None:
    cfg = _compose(overrides)
    cfg.cache_dir = str(tmp_path / "cache")
    with pytest.raises(QatError) as err:
        run_detection(cfg, tmp_path / "run")
    assert str(err.value).startswith(key) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def prepared_core():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    detector = build_detector("mobilenet_v2", num_categories=3, width_mult=0.35, resolution=64)
    prepared = prepare(detector.core, QuantConfig(), torch.zeros(1, 3, 64, 64))
    with calibration_mode(prepared), torch.no_grad():
        prepared(torch.rand(4, 3, 64, 64) * 2 - 1)
    return detector, prepared.eval()


# executorch_xnnpack runs the same core too (checked by hand: 0 LSB); its lowering takes ~30 s, too slow here
@pytest.mark.parametrize("engine", ["torch_native_x86", "onnxruntime"])
def test_integer_core_runs_on_every_int8_engine(engine: str, prepared_core) -> None:  # type: ignore[no-untyped-def]
    from qat.engines import registry

    torch.set_num_threads(1)
    detector, prepared = prepared_core
    int_model = convert(prepared)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        simulated = prepared(x)
    lsb = (registry.build_int(engine, int_model, 1)(x) - simulated).abs() / int_model.nodes[-2].out.scale
    assert float(lsb.mean()) < 0.5 and float(lsb.max()) <= 16  # stated tolerance, in output LSBs
    split = detector.split(simulated)  # the flat core output splits into torchvision's head outputs
    assert split["cls_logits"].shape[:2] == split["bbox_regression"].shape[:2] and split["cls_logits"].shape[2] == 4


def test_rerun_in_the_same_directory_resumes_from_checkpoints(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    cfg.quant.precision = "float"
    cfg.train.cache_float = False
    first = run_detection(cfg, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "float_last.pt"
    stamp = checkpoint.stat().st_mtime_ns
    second = run_detection(cfg, tmp_path / "run")  # every epoch is checkpointed: nothing left to train
    assert checkpoint.stat().st_mtime_ns == stamp
    assert second["accuracy"]["float_map"] == first["accuracy"]["float_map"]


def test_detector_weights_load_from_local_files_only(tmp_path: Path) -> None:
    from qat.train.checkpoint import save_checkpoint

    torch.manual_seed(1)
    source = build_detector("mobilenet_v1", num_categories=2, width_mult=0.25, resolution=64)
    save_checkpoint(tmp_path / "cached.pt", {"model": source.state_dict()})  # what the float cache writes
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    for name in ("cached.pt", "plain.pt"):
        loaded = build_detector("mobilenet_v1", num_categories=2, width_mult=0.25, resolution=64,
                                weights=str(tmp_path / name))
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values(),
                                                     strict=True))
    with pytest.raises(QatError, match="model.weights: .*missing.pt does not exist"):
        build_detector("mobilenet_v1", num_categories=2, width_mult=0.25, resolution=64,
                       weights=str(tmp_path / "missing.pt"))
    with pytest.raises(QatError, match="model.weights: .*does not fit this model"):
        build_detector("mobilenet_v1", num_categories=3, width_mult=0.25, resolution=64,
                       weights=str(tmp_path / "plain.pt"))


def test_detection_resumes_mid_epoch_exactly_on_the_training_engine(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """One training engine (issue 17): a detection run stopped mid-epoch resumes from its step checkpoint (RNG
    included) and ends with the weights and mAP of an uninterrupted run."""
    import qat.detection.train as detection_train

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    cfg.quant.precision, cfg.data.batch_size = "float", 4  # 4 steps per epoch
    cfg.train.cache_float, cfg.train.checkpoint_every_steps, cfg.train.float_epochs = False, 1, 2
    expected = run_detection(cfg, tmp_path / "uninterrupted")

    calls = {"n": 0}
    real_loss = detection_train.detection_loss

    def crashing_loss(device, memory_format=torch.contiguous_format):  # type: ignore[no-untyped-def]
        inner = real_loss(device, memory_format)

        def loss(detector, batch):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 7:  # the 3rd batch of epoch 2
                raise RuntimeError("killed")
            return inner(detector, batch)
        return loss

    monkeypatch.setattr(detection_train, "detection_loss", crashing_loss)
    with pytest.raises(RuntimeError, match="killed"):
        run_detection(cfg, tmp_path / "run")
    monkeypatch.undo()
    resumed = run_detection(cfg, tmp_path / "run")
    assert resumed["accuracy"] == expected["accuracy"]
    ours, theirs = (load_checkpoint(tmp_path / d / "checkpoints" / "float_last.pt")["model"]
                    for d in ("run", "uninterrupted"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_detector_trains_and_detects_on_its_device(device: torch.device) -> None:
    """Anchors, matches and detections live on the device of the core's output: a training step and an eval
    pass on CUDA (anchors were built on the CPU, and matching CUDA boxes against them failed)."""
    torch.manual_seed(0)
    detector = build_detector("mobilenet_v2", num_categories=3, width_mult=0.35, resolution=64).to(device)
    images = [torch.rand(3, 64, 80, device=device), torch.rand(3, 72, 64, device=device)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]], device=device),
                "labels": torch.tensor([2], device=device)},
               {"boxes": torch.zeros(0, 4, device=device), "labels": torch.zeros(0, dtype=torch.int64, device=device)}]
    detector.train()
    losses = detector(images, targets)
    (losses["bbox_regression"] + losses["classification"]).backward()
    assert int(losses["num_foreground"]) > 0
    assert {p.grad.device.type for p in detector.parameters() if p.grad is not None} == {device.type}
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert [d["boxes"].device.type for d in detections] == [device.type] * 2


def test_detection_trains_in_bf16_autocast_on_the_cpu(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    cfg.quant.precision, cfg.train.amp = "float", "bf16"
    record = run_detection(cfg, tmp_path / "run")
    assert 0.0 <= record["accuracy"]["map"] <= 100.0
    assert record["training"] == {"device": "cpu", "world_size": 1, "batch_size_per_process": 8, "autocast": "bfloat16",
                                  "memory_format": "contiguous", "memory_format_reason": CPU_AUTOCAST_NCHW,
                                  "checkpoint_every_steps": 0, "compiled": False,
                                  "compile_mode": None}  # NHWC asked for, NCHW ran


def test_ptq_detection_goes_through_the_one_pipeline_tracked_and_timed_in_subprocesses(tmp_path: Path) -> None:
    """One run pipeline (issue 17): ``method=ptq`` works for detection, the tracker gets its training steps and
    accuracies, and the whole detector and its integer core are timed in fresh subprocesses."""
    import csv
    import os

    from qat.schema import LoggerConfig
    from qat.tracking import open_logger

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path)
    cfg.method = "ptq"
    cfg.ptq.calibration_batches = 1
    run_dir = tmp_path / "run"
    with open_logger(LoggerConfig(name="csv"), run_dir, config={}, group=None, run_name=None) as tracker:
        record = run(cfg, run_dir, DETECTION, tracker=tracker)
    assert record["method"] == "ptq_minmax" and record["task"] == "detection" and "ptq" in record
    assert record["accuracy"]["map"] == record["accuracy"]["int_map"]
    for block in (record["latency"], record["latency_float"]):
        assert block["threads_in_child"]["pid"] != os.getpid()  # measured in a child process
        # both measured (separately, so a loaded host may order them either way: timings are not asserted)
        assert block["scope"].startswith("detector") and block["core_median_ms"] > 0 and block["median_ms"] > 0
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    names = {row["key"] for row in rows}
    assert {"loss", "map/float", "map/sim", "map/int", "map"} <= names, names
