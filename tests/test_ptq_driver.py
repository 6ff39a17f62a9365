"""The ptq driver (``experiments/run.py method=ptq``) and the eval driver (``experiments/eval.py``) on tiny
generated data: the record names its method and holds the PTQ report; two-tensor layers give a simulated-only
record; the eval driver reproduces the run's integer top-1 from the saved int_model.pt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_CLASSIFICATION, load_eval_app, overrides
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qat.errors import QatError
from qat.pipeline import run_classification
from qat.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = ["data.demo.num_classes=4", "data.demo.train_per_class=24", "data.demo.val_per_class=8"]
TINY = overrides(TINY_CLASSIFICATION, {"train.float_epochs": 1})
PTQ = ["method=ptq", "ptq=adaquant", "ptq.adaquant_iterations=2", "ptq.adaquant_batch=8",
       "ptq.calibration_batches=1", "quant=w4a8"]


def app(script: str, args: list[str], cache: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QAT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("QAT_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """One few-step AdaQuant W4A8 run through the Hydra app: (cache, run dir, record)."""
    base = tmp_path_factory.mktemp("ptq")
    run_dir = base / "run"
    result = app("run.py", [*TINY, *PTQ, f"hydra.run.dir={run_dir}"], base / "cache", base)
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "cache", run_dir, json.loads((run_dir / "record.json").read_text())


def test_ptq_run_records_its_method_and_report(ptq_run: tuple[Path, Path, dict[str, Any]]) -> None:
    _, run_dir, record = ptq_run
    assert record["method"] == "ptq_minmax+adaquant"
    assert record["quant"]["weight_bits"] == 4 and record["quant"]["act_bits"] == 8
    # read back from the evaluated model: PTQ replaced quant.act_observer=ema and calibrated 1 batch, not 4
    assert record["quant"]["act_observer"] == "minmax" and record["quant"]["calibration_batches"] == 1
    assert record["quant"]["config_differences"]["act_observer"] == {"config": "ema", "ran": "minmax"}
    report = record["ptq"]
    assert report["method"] == "minmax+adaquant" and report["config"]["adaquant_iterations"] == 2
    assert report["calibration_images"] == 16  # 1 batch of data.batch_size, training images
    assert report["adaquant"] and report["timing"]["adaquant_s"] > 0
    assert "qat_train_s" not in record["timing"] and record["timing"]["ptq_s"] > 0
    assert not (run_dir / "checkpoints" / "qat_last.pt").exists()  # no fine-tuning happened
    acc = record["accuracy"]
    assert acc["top1"] == acc["int_top1"] and {"float_top1", "sim_top1"} <= set(acc)
    assert record["fidelity"]["sim_vs_int_top1_agreement"] >= 75.0
    assert (run_dir / "int_model.pt").exists() and record["latency"]["median_ms"] > 0


def test_eval_driver_reproduces_the_runs_integer_top1(ptq_run: tuple[Path, Path, dict[str, Any]]) -> None:
    cache, run_dir, record = ptq_run
    out = run_dir.parent / "eval"
    result = app("eval.py", [f"checkpoint={run_dir / 'int_model.pt'}", *TINY_DATA, f"hydra.run.dir={out}"],
                 cache, run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["kind"] == "int8" and evaluation["engine"] == "torch_native_x86"
    assert evaluation["model"] == {"arch": "mobilenet_v2", "width_mult": 0.35, "resolution": 32}
    assert evaluation["accuracy"]["top1"] == record["accuracy"]["int_top1"]
    assert evaluation["data"]["val_size"] == record["data"]["val_size"] == 32


def load_eval_module() -> Any:
    return load_eval_app("qat_eval_app")


def test_eval_refuses_weights_of_another_architecture(ptq_run: tuple[Path, Path, dict[str, Any]]) -> None:
    cache, _, _ = ptq_run
    evaluation = load_eval_module()
    (weights,) = sorted((cache / "float").glob("*.pt"))  # the run's float weights (MobileNet v2 0.35)
    cfg = evaluation.EvalConfig(checkpoint=str(weights), cache_dir=str(cache))
    cfg.model.arch, cfg.model.resolution = "resnet18", 32
    cfg.data.demo.num_classes, cfg.data.demo.train_per_class, cfg.data.demo.val_per_class = 4, 24, 8
    with pytest.raises(QatError, match=r"^checkpoint: .* does not fit this architecture"):
        evaluation.evaluate(cfg)
    cfg.model.arch, cfg.model.width_mult = "mobilenet_v2", 0.35
    assert evaluation.evaluate(cfg)["kind"] == "float"
    cfg.checkpoint = str(cache / "nothing.pt")
    with pytest.raises(QatError, match=r"^checkpoint: .*nothing.pt does not exist"):
        evaluation.evaluate(cfg)


def test_two_tensor_layers_give_a_simulated_only_record(ptq_run: tuple[Path, Path, dict[str, Any]],
                                                        tmp_path: Path) -> None:
    cache, _, _ = ptq_run
    sys.path.insert(0, str(ROOT / "experiments"))
    from _cli import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("run", overrides=[*TINY, "method=ptq", "ptq=mse_two_tensor", "ptq.two_tensor_threshold=1e-9",
                                        "ptq.calibration_batches=1", "quant=w4a8", f"cache_dir={cache}"])
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, RunConfig)
    torch.set_num_threads(1)
    record = run_classification(config, tmp_path)
    assert record["method"] == "ptq_mse+two_tensor"
    assert record["model"]["float_source"].startswith("cache:")  # the same float weights as the first run
    assert record["ptq"]["two_tensor"]["layers"] and record["ptq"]["two_tensor"]["extra_weight_bits"] > 0
    assert record["fidelity"]["integer_model"].startswith("not convertible: convert.")
    assert record["status"] == "simulated_only" and "sim_top1" in record["accuracy"]
    assert not {"top1", "top5", "int_top1"} & set(record["accuracy"])
    assert record["latency"]["median_ms"] is None and record["latency_float"]["median_ms"] > 0
    assert not (tmp_path / "int_model.pt").exists()
    assert json.loads((tmp_path / "record.json").read_text())["method"] == "ptq_mse+two_tensor"


@pytest.mark.slow
@pytest.mark.full  # AdaQuant end to end in make test: test_ptq_run_records_its_method_and_report's run
def test_adaquant_beats_minmax_at_w4a8_on_demo_data(tmp_path: Path) -> None:
    """Issue 8 / Hubara et al. Table 1 in miniature: same float model (trained once, shared through the float
    cache), W4A8 post-training, min/max ranges against min/max + sequential AdaQuant; integer top-1. The float
    model must have learned something for 4-bit weights to cost accuracy: after 8 epochs at lr 0.02 it stood at
    42% (6 classes) and min/max W4A8 scored above it on one host; after 20 at 0.01 (AMD EPYC, seeds 0 and 1) float
    63.0 / 56.0, min/max 52.3 / 45.7, AdaQuant 62.3 / 56.0."""
    data = ["data.demo.num_classes=6", "data.demo.train_per_class=200", "data.demo.val_per_class=50",
            "train.float_epochs=20", "optim.lr=0.01", "data.batch_size=32"]
    base = [*TINY, *data, "method=ptq", "quant=w4a8", "ptq.calibration_batches=2", "latency.eval_engines=[]"]
    top1 = {}
    for name in ("minmax", "adaquant"):
        run_dir = tmp_path / name
        result = app("run.py", [*base, f"ptq={name}", f"hydra.run.dir={run_dir}"], tmp_path / "cache", tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        top1[name] = json.loads((run_dir / "record.json").read_text())["accuracy"]["top1"]
    assert top1["adaquant"] > top1["minmax"] + 3.0, top1
