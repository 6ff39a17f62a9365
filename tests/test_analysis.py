"""Analysis layer: records -> DataFrame, Pareto front, results.csv, trade-off plot, the report app."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from matplotlib.image import imread

from qat.analysis import load_records, pareto_front, plot_tradeoff, write_report
from qat.analysis.plots import latency_axis_label, model_label
from qat.analysis.report import CORE_COLUMNS
from qat.errors import QatError

REPO = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "schema": "qat.record/1",
    "run_id": "20261122-214001-ab12cd",
    "model_id": "mobilenet_v2-w0.5-r32-int8-3f9a1c2e",
    "status": "ok",
    "experiment": "demo",
    "seed": 0,
    "model": {"arch": "mobilenet_v2", "width_mult": 0.5, "resolution": 32, "num_classes": 10},
    "data": {"name": "demo", "val_size": 500},
    "quant": {"precision": "int8", "weight_bits": 8, "act_bits": 8, "weight_granularity": "per_channel"},
    "accuracy": {"top1": 90.2, "float_top1": 91.0, "sim_top1": 90.4, "int_top1": 90.2},
    "fidelity": {"sim_vs_int_top1_agreement": 99.4},
    "latency": {"engine": "torch_native_x86", "threads": 1, "batch": 1, "median_ms": 1.9, "p10_ms": 1.8,
                "p90_ms": 2.1},
}  # fmt: skip


def record(width: float, resolution: int, precision: str, top1: float, median_ms: float) -> dict[str, Any]:
    """A valid record like the driver writes; float runs have 32 bits and only top1/float_top1."""
    rec = copy.deepcopy(BASE)
    rec["model_id"] = f"mobilenet_v2-w{width}-r{resolution}-{precision}-0000"
    rec["model"].update(width_mult=width, resolution=resolution)
    if precision == "float":
        rec["quant"].update(precision="float", weight_bits=32, act_bits=32)
        rec["accuracy"] = {"top1": top1, "float_top1": top1}
        del rec["fidelity"]
    else:
        rec["quant"]["precision"] = precision
        rec["accuracy"].update(top1=top1, int_top1=top1)
    rec["latency"].update(
        median_ms=median_ms, p10_ms=round(median_ms * 0.9, 3), p90_ms=round(median_ms * 1.1, 3)
    )
    return rec


def write(root: Path, name: str, content: Any) -> Path:
    path = root / name / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Three valid runs (one nested deeper), a corrupt one and a wrong-schema one."""
    root = tmp_path / "runs"
    write(root, "b", record(1.0, 32, "int8", 91.5, 3.0))
    write(root, "a", record(0.5, 32, "int8", 90.2, 1.9))
    write(root, "sweep/c", record(0.5, 32, "float", 91.0, 4.0))
    write(root, "corrupt", '{"schema": "qat.record/1", "model_id": ')
    write(root, "other", {**BASE, "schema": "someone.else/2"})
    return root


def test_load_records_flattens_sorts_and_skips(runs: Path) -> None:
    df, skipped = load_records(runs)
    assert list(df["model_id"]) == [
        "mobilenet_v2-w0.5-r32-float-0000",
        "mobilenet_v2-w0.5-r32-int8-0000",
        "mobilenet_v2-w1.0-r32-int8-0000",
    ]
    assert {"model.arch", "accuracy.top1", "latency.median_ms", "quant.weight_bits", "record_path"} <= set(df)
    assert df["record_path"].tolist() == [str(runs / p / "record.json") for p in ("sweep/c", "a", "b")]
    assert df.loc[1, "latency.median_ms"] == 1.9 and df.loc[0, "quant.weight_bits"] == 32
    assert math.isnan(df.loc[0, "accuracy.sim_top1"])
    reasons = {path.parent.name: reason for path, reason in skipped}
    assert set(reasons) == {"corrupt", "other"}
    assert reasons["corrupt"].startswith("invalid JSON")
    assert "someone.else/2" in reasons["other"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ({k: v for k, v in BASE.items() if k != "accuracy"}, "required field(s): accuracy.top1 or accuracy.map"),
        ({**BASE, "quant": "int8"}, "missing required field(s): quant.precision"),
        ({**BASE, "accuracy": {"top1": "90"}}, "accuracy.top1 must be a finite number"),
        ({**BASE, "accuracy": {"top1": 101.5}}, "outside 0..100"),
        ([BASE], "not a JSON object"),
        (b"\xff\xfe".decode("latin-1"), "invalid JSON"),
    ],
)
def test_invalid_records_are_skipped_with_a_reason(tmp_path: Path, content: Any, reason: str) -> None:
    write(tmp_path, "good", BASE)
    bad = write(tmp_path, "bad", content)
    df, skipped = load_records(tmp_path)
    assert len(df) == 1
    assert len(skipped) == 1 and skipped[0][0] == bad and reason in skipped[0][1]


def test_pareto_front_exact() -> None:
    df = pd.DataFrame(
        {
            "latency.median_ms": [1.0, 2.0, 2.0, 3.0, 1.5, 3.0, 3.0, None, 0.5, 4.0],
            "accuracy.top1": [80.0, 85.0, 84.0, 90.0, 80.0, 90.0, 88.0, 99.0, float("nan"), 90.0],
        },
        index=list("abcdefghij"),
    )
    # a, b, d: the front; f: exact tie with d (neither dominates); c: same latency as b, lower accuracy;
    # e: same accuracy as a, slower; g: dominated by d; h, i: NaN; j: same accuracy as d, slower.
    front = pareto_front(df)
    assert front.index.equals(df.index) and front.dtype == bool
    assert front[front].index.tolist() == ["a", "b", "d", "f"]
    assert not pareto_front(df.drop(columns="latency.median_ms")).any()
    assert pareto_front(df, x="accuracy.top1", y="latency.median_ms").sum() >= 1  # other axes work too


def test_write_report_csv_exact(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    result = write_report(runs, out)
    assert result["csv"] == out / "results.csv"
    assert result["plots"] == [out / "tradeoff.png", out / "tradeoff.pdf", out / "sim_int_gap.png",
                               out / "sim_int_gap.pdf"]  # int8 runs have sim and int top-1: gap plot too
    assert (out / "summary.csv").exists() and (out / "summary.md").read_text().startswith("# Report")
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    header = list(rows[0])
    assert header[: len(CORE_COLUMNS) + 1] == [*CORE_COLUMNS, "pareto"]
    assert "record_path" in header and "fidelity.sim_vs_int_top1_agreement" in header
    core = [[row[c] for c in (*CORE_COLUMNS, "pareto")] for row in rows]
    assert core == [
        ["mobilenet_v2-w0.5-r32-float-0000", "mobilenet_v2", "0.5", "32", "float", "float", "32", "32", "top1",
         "91.0", "False", "", "91.0", "91.0", "", "",
         "torch_native_x86", "", "1", "4.0", "3.6", "4.4", "record", "False"],
        ["mobilenet_v2-w0.5-r32-int8-0000", "mobilenet_v2", "0.5", "32", "qat", "int8", "8", "8", "top1",
         "90.2", "False", "90.4", "90.2", "91.0", "90.4", "90.2",
         "torch_native_x86", "", "1", "1.9", "1.71", "2.09", "record", "True"],
        ["mobilenet_v2-w1.0-r32-int8-0000", "mobilenet_v2", "1.0", "32", "qat", "int8", "8", "8", "top1",
         "91.5", "False", "90.4", "91.5", "91.0", "90.4", "91.5",
         "torch_native_x86", "", "1", "3.0", "2.7", "3.3", "record", "True"],
    ]  # fmt: skip
    printed = capsys.readouterr().out
    assert "3 record(s)" in printed and "skipped 2 record(s)" in printed and "corrupt" in printed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_missing_columns_are_empty_and_no_latency_means_no_plot(tmp_path: Path) -> None:
    rec = {k: v for k, v in record(0.5, 32, "float", 91.0, 1.0).items() if k not in ("latency", "model")}
    write(tmp_path / "runs", "x", rec)
    result = write_report(tmp_path / "runs", tmp_path / "out")
    assert result["plots"] == [] and not (tmp_path / "out" / "tradeoff.png").exists()
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["model.arch"] == "" and row["latency.median_ms"] == "" and row["pareto"] == "False"


def test_plot_is_written_and_not_blank(runs: Path, tmp_path: Path) -> None:
    df, _ = load_records(runs)
    paths = plot_tradeoff(df, tmp_path / "plot.png")
    assert paths == [tmp_path / "plot.png", tmp_path / "plot.pdf"]
    assert paths[0].stat().st_size > 20_000
    assert paths[1].read_bytes().startswith(b"%PDF")
    pixels = imread(paths[0])
    assert pixels.shape[0] > 500 and pixels.shape[1] > 700
    assert pixels[..., :3].var() > 0.005  # not a blank canvas
    assert (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.005  # some dark ink: text, axes


def test_labels() -> None:
    df, _ = pd.json_normalize([record(0.5, 32, "int8", 90.0, 1.0)]), None
    assert model_label(df.iloc[0]) == "w0.5 r32"
    assert model_label(df.iloc[0], with_arch=True) == "mobilenet_v2 w0.5 r32"
    assert model_label(pd.Series({"model_id": "m"})) == "m"
    assert latency_axis_label(df) == "latency, median ms (batch 1, 1 thread, torch_native_x86)"
    df2 = pd.concat([df, df.assign(**{"latency.threads": 4})])
    assert (
        latency_axis_label(df2, "latency.p90_ms")
        == "latency, p90 ms (batch 1, 1/4 threads, torch_native_x86)"
    )


@pytest.mark.parametrize("case", ["missing", "empty", "only_invalid"])
def test_bad_root_raises(tmp_path: Path, case: str) -> None:
    root = tmp_path / "runs"
    if case != "missing":
        root.mkdir()
    if case == "only_invalid":
        write(root, "bad", "not json")
    with pytest.raises(QatError) as info:
        write_report(root, tmp_path / "out")
    assert info.value.key == "records" and str(info.value).startswith("records: ")
    assert not (tmp_path / "out").exists()


def run_app(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, str(REPO / "experiments" / "report.py"), *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_report_app_end_to_end(runs: Path, tmp_path: Path) -> None:
    proc = run_app(tmp_path, "records=runs", "out=rep")  # relative to the launch directory
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {
        "results.csv", "summary.csv", "summary.md", "fidelity.csv", "tradeoff.png", "tradeoff.pdf", "sim_int_gap.png",
        "sim_int_gap.pdf"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "runs"]  # Hydra left nothing behind
    assert "mobilenet_v2-w1.0-r32-int8-0000" in proc.stdout and "corrupt" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [("records=nowhere", "out=rep"), ("out=rep",)])
def test_report_app_bad_input_exits_2(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    proc = run_app(tmp_path, *overrides)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: records: "), proc.stderr
    assert not (tmp_path / "rep").exists()


def test_unreadable_records_are_skipped(tmp_path: Path) -> None:
    write(tmp_path, "good", BASE)
    (tmp_path / "dir" / "record.json").mkdir(parents=True)  # a directory with the record's name
    (tmp_path / "bytes").mkdir()
    (tmp_path / "bytes" / "record.json").write_bytes(b'{"schema": "\xff"}')
    df, skipped = load_records(tmp_path)
    assert len(df) == 1
    assert sorted(path.parent.name for path, _ in skipped) == ["bytes", "dir"]
    assert all(reason.startswith("unreadable") for _, reason in skipped)


def test_precision_pairs_pairs_float_and_int8_by_model_size() -> None:
    from qat.analysis.report import precision_pairs

    rows = []
    for width, (f_acc, q_acc, f_ms, q_ms) in {0.5: (90.0, 89.0, 4.0, 2.0), 1.0: (92.0, 91.5, 8.0, 2.5)}.items():
        for precision, acc, ms in (("float", f_acc, f_ms), ("int8", q_acc, q_ms)):
            rows.append({"model.arch": "mobilenet_v2", "model.width_mult": width, "model.resolution": 32,
                         "quant.precision": precision, "accuracy.top1": acc, "latency.median_ms": ms})
    pairs = precision_pairs(pd.DataFrame(rows))
    assert pairs["width_mult"].tolist() == [0.5, 1.0]
    assert pairs["top1_drop"].tolist() == pytest.approx([1.0, 0.5])
    assert pairs["int8_speedup"].tolist() == pytest.approx([2.0, 3.2])


def test_per_layer_bit_widths_and_learned_steps_name_their_series() -> None:
    """A record whose layers differ in width (``{"mixed": {bits: layers}}``, e.g. 8-bit first and last layers)
    keeps its widths as ``4/8`` and its series says so, and learned step sizes are a series of their own."""
    from qat.analysis.engines import bits_label
    from qat.analysis.records import add_derived_columns
    from qat.analysis.report import series_labels

    rows = [{"quant": {"precision": "int8", "weight_bits": {"mixed": {"4": 51, "8": 2}}, "act_bits": 4,
                       "weight_observer": observer, "act_observer": "lsq_plus" if observer == "lsq" else "ema"},
             "method": "qat", "accuracy": {"top1": 50.0}} for observer in ("current", "lsq")]
    frame = add_derived_columns(pd.json_normalize(rows, sep="."))
    assert list(frame["quant.weight_bits"]) == ["4/8", "4/8"] and bits_label(frame.iloc[0]) == "w4/8a4"
    assert list(series_labels(frame)) == ["qat w4/8a4", "qat w4/8a4 lsq"]
