"""Subprocess latency harness and the latency app: real engines on tiny models (32x32, few repeats).

No timing is asserted: the tests check the statistics' shape, that threads and affinity were fixed in the child,
that records are what the analysis joins, and that bad input gives one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qat.analysis import load_records
from qat.analysis.latency import join_latency, load_latency_records
from qat.engines.registry import ENGINES
from qat.errors import QatError
from qat.latency.random_models import random_float_model, random_int_model
from qat.latency.subprocess import MeasureSpec, measure_in_subprocess

ROOT = Path(__file__).resolve().parents[1]
TINY = {"arch": "mobilenet_v2", "width_mult": 0.35, "num_classes": 10, "resolution": 32}
FAST = {"warmup": 1, "repeats": 4, "min_time_s": 0.0}


@pytest.fixture(scope="module")
def int_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    model = random_float_model(TINY["arch"], width_mult=TINY["width_mult"], num_classes=10, resolution=32)
    return random_int_model(model, resolution=32).save(tmp_path_factory.mktemp("m") / "int_model.pt")


@pytest.mark.parametrize(("engine", "precision", "threads", "compiled"), [
    ("torch_eager", "float", 1, False),  # PyTorch: float eager ...
    ("onnxruntime", "int8", 2, False),  # ... and a second engine, int8, on two threads
    ("onnxruntime", "int8", 1, True),  # the same engine loading a compiled .onnx (qat.export format)
])
def test_child_returns_stats_with_threads_fixed(int_model_path: Path, tmp_path: Path, engine: str, precision: str,
                                               threads: int, compiled: bool) -> None:
    torch.set_num_threads(1)  # the parent's own setting must not leak into the child
    engine_file = None
    if compiled:
        from qat.export import onnx as onnx_format
        from qat.intmodel.graph import IntModel

        engine_file = tmp_path / "m.onnx"
        engine_file.write_bytes(onnx_format.int_bytes(IntModel.load(int_model_path)))
    spec = MeasureSpec(engine=engine, precision=precision, int_model=str(int_model_path), threads=threads,
                       engine_file=str(engine_file) if engine_file else None, **TINY, **FAST)
    result = measure_in_subprocess(spec, timeout_s=300)
    stats, child = result["stats"], result["child"]
    assert stats["n"] == 4 and stats["warmup"] == 1 and stats["threads"] == threads and stats["batch"] == 1
    assert 0 < stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"] and stats["std_ms"] >= 0
    assert result["engine"]["engine"] == engine and result["engine"]["engine_version"]
    assert result["input_shape"] == [1, 3, 32, 32]
    assert child["torch_threads"] == threads and child["pid"] != os.getpid()
    assert child["env"] == {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                            "OPENBLAS_NUM_THREADS": str(threads)}
    if engine == "onnxruntime":
        assert child["engine_threads"] == threads  # the session's intra-op pool
    if hasattr(os, "sched_getaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        assert child["affinity"] == allowed[:threads]  # affinity=auto pins to the first `threads` CPUs
    assert result["host"]["cpu"] and result["host"]["torch"]


def test_bad_specs_fail_in_the_parent_with_one_line(int_model_path: Path, tmp_path: Path) -> None:
    base = MeasureSpec(engine="torch_native_x86", int_model=str(int_model_path), **FAST)
    with pytest.raises(QatError, match="latency.engine: unknown value 'tensorrt'"):
        measure_in_subprocess(replace(base, engine="tensorrt"))
    with pytest.raises(QatError, match="no int8 path"):
        measure_in_subprocess(replace(base, engine="torch_eager"))
    with pytest.raises(QatError, match="does not exist"):
        measure_in_subprocess(replace(base, int_model=str(tmp_path / "missing.pt")))
    with pytest.raises(QatError, match="latency.threads"):
        measure_in_subprocess(replace(base, threads=0))
    with pytest.raises(QatError, match="latency.affinity"):
        measure_in_subprocess(replace(base, affinity=[10_000]))
    with pytest.raises(QatError, match="does not load compiled files"):
        measure_in_subprocess(replace(base, engine_file=str(int_model_path)))
    with pytest.raises(QatError, match="needs an input resolution"):
        measure_in_subprocess(replace(base, precision="float", engine="torch_eager", arch="resnet18"))


def test_engine_not_installed_is_one_line_before_any_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "experiments"))
    import latency as app

    monkeypatch.setitem(ENGINES, "onnxruntime", replace(ENGINES["onnxruntime"], package="qat_no_such_package"))
    cfg = app.LatencyAppConfig(arch="resnet18", resolution=32, out="x", float_engine="onnxruntime")
    with pytest.raises(QatError, match="needs the Python package 'qat_no_such_package', which is not installed"):
        app.plan(cfg)


def _run_record(run_dir: Path, model_id: str, precision: str) -> None:
    run_dir.mkdir(parents=True)
    record = {"schema": "qat.record/1", "model_id": model_id, "status": "ok", "quant": {"precision": precision},
              "model": {**TINY}, "accuracy": {"top1": 50.0}}
    (run_dir / "record.json").write_text(json.dumps(record))


def _app(*overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "latency.py"), *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)


def test_app_measures_a_tree_and_the_analysis_joins_it(int_model_path: Path, tmp_path: Path) -> None:
    tree = tmp_path / "multirun"
    _run_record(tree / "0", "tiny-float", "float")
    _run_record(tree / "1", "tiny-int8", "int8")
    (tree / "1" / "int_model.pt").write_bytes(int_model_path.read_bytes())
    _run_record(tree / "2", "tiny-int8-damaged", "int8")
    (tree / "2" / "int_model.pt").write_bytes(b"not a model")
    store = tmp_path / "store"
    proc = _app(f"tree={tree}", f"out={store}", "repeats=3", "warmup=1", "min_time_s=0", "device=ci")
    assert proc.returncode == 0, proc.stderr
    # the damaged model is reported unsupported with its reason, never measured some other way
    assert "unsupported: tiny-int8-damaged" in proc.stderr and "int_model.pt" in proc.stderr
    summary = json.loads(next(store.glob("jobs-latency-*.json")).read_text())
    assert [s["status"] for s in summary] == ["ok", "ok", "unsupported"]

    latency, skipped = load_latency_records(store)
    assert not skipped and sorted(latency["model_id"]) == ["tiny-float", "tiny-int8"]
    assert set(latency["latency.engine"]) == {"torch_eager", "torch_native_x86"}
    records, _ = load_records(tree)
    joined = join_latency(records, latency).set_index("model_id")
    assert joined.loc["tiny-int8", "latency.engine"] == "torch_native_x86"
    assert joined.loc["tiny-int8", "latency.device"] == "ci" and joined.loc["tiny-int8", "latency.n"] == 3
    assert joined.loc["tiny-float", "latency.median_ms"] > 0
    assert pd_isna(joined.loc["tiny-int8-damaged", "latency.median_ms"])
    record = json.loads(next((store / "1").glob("latency-*.json")).read_text())
    assert record["host"]["cpu"] and record["child"]["torch_threads"] == 1 and record["precision"] == "int8"


def pd_isna(value: object) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_app_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "experiments"))
    import latency as app
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    store = f"out={tmp_path / 'store'}"
    cases = [
        ([f"int_model={tmp_path / 'nowhere'}", store], f"int_model: {tmp_path / 'nowhere'} does not exist "
                                                       "(give an int_model.pt or the run directory holding it)"),
        (["arch=resnet18", f"tree={tmp_path}"], "int_model: give exactly one of int_model=, arch=, tree= (got 2)"),
        ([f"tree={tmp_path}", "engine=tensorrt", store], "tree: no record.json under"),
        (["arch=resnet18", "resolution=32", "float_engine=tensorrt", store], "float_engine: unknown value"),
        (["arch=resnet18", "resolution=32"], "out: a float model spec has no directory of its own"),
        (["arch=resnet18", "resolution=32", "threads=0", store], "threads: 0 is not a positive count"),
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for overrides, line in cases:
            cfg = OmegaConf.to_object(compose("latency_app", overrides=overrides))
            with pytest.raises(SystemExit) as exit_info:
                app.run(cfg)
            err = capsys.readouterr().err.strip().splitlines()
            assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {line}"), err
        with pytest.raises(Exception, match="thread"):  # a misspelt key fails when the config is composed
            compose("latency_app", overrides=["thread=2"])
    assert not (tmp_path / "store").exists()
