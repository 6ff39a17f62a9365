"""The report shows every int8 engine of a run beside the simulated model (issue 14 item 5): the fidelity table of
``summary.md`` / ``fidelity.csv``, one bar per engine in ``sim_int_gap``, its host/target subtitle, and records
written before ``target`` and ``fidelity.engines`` existed."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from test_analysis_layer import rec, write

import qat.analysis.comparisons as comparisons
import qat.analysis.plots as plots
from qat.analysis import load_records, write_report
from qat.analysis.comparisons import gap_table, plot_sim_int_gap
from qat.analysis.engines import engine_fidelity_table, engine_rows, host_target_line

W05 = ("mobilenet_v2", 0.5, 32)
CPU = "AMD EPYC 9654 96-Core Processor"
FLAGS = ["avx2", "avx512f", "avx512_vnni", "fma"]
TARGET = {"name": "x86_vnni", "chosen": "auto: the host has avx512_vnni", "accumulation": "int32",
          "host_flags": FLAGS, "constraints": []}
HOST = {"cpu": CPU, "cores": 2, "cpu_flags": FLAGS}
REASON = "engine: onnxruntime is not installed (pip install onnxruntime)"


def lsb(top1: float, agreement: float, high: float, mean: float, within: float) -> dict[str, Any]:
    """An engine that ran, its differences in output LSBs."""
    return {"status": "ok", "top1": top1, "agreement_with_sim": agreement, "logit_diff_unit": "lsb",
            "logit_max_abs_diff_lsb": high, "logit_mean_abs_diff_lsb": mean, "logits_within_1lsb": within}


def run(seed: int, native: dict[str, Any], reference: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A QAT w8a8 run on torch_native_x86 (primary), the reference engine and an uninstalled onnxruntime."""
    record = rec(*W05, "qat", seed, native["top1"], 1.5, sim=70.0, target=TARGET, host=HOST, **extra)
    engines = {"torch_native_x86": native, "reference": reference,
               "onnxruntime": {"status": "unsupported", "reason": REASON}}
    record["fidelity"] = {"primary_engine": "torch_native_x86", "engines": engines,
                          "sim_vs_int_top1_agreement": native["agreement_with_sim"]}
    return record


def old_run(width: float, top1: float, sim: float) -> dict[str, Any]:
    """A record from before targets and several engines: the primary engine's numbers at the top of fidelity."""
    record = rec("mobilenet_v2", width, 32, "qat", 0, top1, 2.0, sim=sim)
    record["fidelity"] = {"sim_vs_int_top1_agreement": 97.5, "logit_max_abs_diff_lsb": 3.0,
                          "logit_mean_abs_diff_lsb": 0.25}
    return record


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Two seeds of one configuration on three engines (onnxruntime unsupported), its float run, and a
    simulated-only run that must stay out."""
    root = tmp_path / "store"
    write(root, "q0", run(0, lsb(69.0, 98.0, 4.0, 0.5, 90.0), lsb(70.0, 100.0, 0.0, 0.0, 100.0)))
    write(root, "q1", run(1, lsb(69.5, 97.0, 6.0, 0.7, 88.0), lsb(70.0, 99.0, 1.0, 0.1, 99.0)))
    write(root, "f0", rec(*W05, "float", 0, 72.0, 3.0, target=TARGET, host=HOST))
    simulated = rec("mobilenet_v3_large", 1.0, 224, "qat", 0, 0.0, None, status="simulated_only")
    simulated["accuracy"] = {"sim_top1": 74.5, "float_top1": 75.0}
    write(root, "sim", simulated)
    return root


def table_of(store: Path) -> pd.DataFrame:
    records, skipped = load_records(store)
    assert skipped == []
    return records


def test_fidelity_table_has_a_row_per_engine_with_means_over_seeds(store: Path) -> None:
    table = engine_fidelity_table(table_of(store)).set_index("engine")
    assert table.index.tolist() == ["torch_native_x86", "onnxruntime", "reference"]  # primary first
    assert set(table["configuration"]) == {"w0.5 r32 w8a8 qat"} and table["n"].tolist() == [2, 2, 2]
    native, reference, onnx = table.loc["torch_native_x86"], table.loc["reference"], table.loc["onnxruntime"]
    assert bool(native["primary"]) and not bool(reference["primary"])
    assert native["int"] == pytest.approx(69.25) and native["gap"] == pytest.approx(-0.75)
    assert native["agreement_with_sim"] == pytest.approx(97.5) and reference["agreement_with_sim"] == 99.5
    assert native["max_abs_diff"] == 5.0 and native["mean_abs_diff"] == pytest.approx(0.6)
    assert native["within_1lsb"] == 89.0 and native["unit"] == "lsb"
    assert reference["int"] == 70.0 and reference["gap"] == 0.0
    assert onnx["status"] == "unsupported" and onnx["reason"] == REASON and pd.isna(onnx["int"])
    assert set(table["target"]) == {"x86_vnni"} and set(table["host_flags"]) == {"avx2 avx512_vnni"}


def test_gap_plot_has_one_bar_per_engine_and_names_host_and_target(store: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    records = table_of(store)
    gaps = gap_table(records).set_index("config")
    assert gaps.index.tolist() == ["w0.5 r32 w8a8 qat · torch_native_x86", "w0.5 r32 w8a8 qat · reference"]
    assert gaps["mean"].tolist() == [pytest.approx(-0.75), 0.0] and gaps["n"].tolist() == [2, 2]
    figures: list[Figure] = []
    monkeypatch.setattr(comparisons, "save_figure", lambda fig, path: figures.append(fig) or [Path(path)])
    plot_sim_int_gap(records, "gap")
    (ax,) = figures[0].axes
    bars = {c.get_label(): [p.get_width() for p in c.patches] for c in ax.containers if isinstance(c, BarContainer)}
    assert bars == {"torch_native_x86 (primary)": [pytest.approx(-0.75)], "reference": [0.0]}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(bars)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["w0.5 r32 w8a8 qat"]
    subtitle = ax.get_title()
    assert subtitle == f"host: {CPU} · 2 cores · avx2 avx512_vnni — target x86_vnni"


def test_tradeoff_plot_names_host_and_target(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures: list[Figure] = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or [Path(path)])
    plots.plot_tradeoff(table_of(store), "tradeoff")
    (ax,) = figures[0].axes
    assert ax.get_title().startswith("Accuracy vs latency")
    assert f"host: {CPU} · 2 cores · avx2 avx512_vnni — target x86_vnni" in [t.get_text() for t in ax.texts]
    figures.clear()
    write_report(store, store.parent / "report")  # the report plots seed means, which lost the host columns
    (ax,) = figures[0].axes
    assert f"host: {CPU} · 2 cores · avx2 avx512_vnni — target x86_vnni" in [t.get_text() for t in ax.texts]


def test_several_hosts_and_targets_are_listed(store: Path) -> None:
    records = table_of(store)
    changes = {"record_path": "other", "target.name": "x86_avx2", "host.cpu": "Intel Xeon", "host.cores": 16,
               "host.cpu_flags": [["avx2", "fma"]]}
    other = records[records["method"] == "qat"].iloc[[0]].assign(**changes)
    hosted = records.dropna(subset=["host.cores"]).astype({"host.cores": int})  # integer cores read as such
    assert host_target_line(hosted) == f"host: {CPU} · 2 cores · avx2 avx512_vnni — target x86_vnni"
    line = host_target_line(pd.concat([records, other], ignore_index=True))
    assert line == (f"hosts: {CPU} · 2 cores · avx2 avx512_vnni; Intel Xeon · 16 cores · avx2 "
                    "— targets x86_avx2, x86_vnni")


def test_report_writes_the_engine_section_and_fidelity_csv(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = write_report(store, out)
    md = (out / "summary.md").read_text()
    section = md.split("## Integer engines vs the simulated model", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| w0.5 r32 w8a8 qat |")]
    assert [r.split(" | ")[1] for r in rows] == ["torch_native_x86", "onnxruntime", "reference"]
    assert f"| unsupported: {REASON} |" in rows[1]
    assert "| 2 | 69.25 | 97.50 | 5.00 | 0.60 | 89.00 | x86_vnni | avx2 avx512_vnni |" in rows[0]
    assert "int top-1 (%)" in section and f"Host: {CPU} · 2 cores" in section and "mobilenet_v3" not in section
    with open(out / "fidelity.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [r["engine"] for r in written] == result["fidelity"]["engine"].tolist()
    assert {p.name for p in result["plots"]} >= {"sim_int_gap.png", "sim_int_gap.pdf"}


def test_records_without_target_or_engines_still_give_a_report(tmp_path: Path) -> None:
    root = tmp_path / "old"
    write(root, "a", old_run(0.5, 90.2, 90.4))
    write(root, "b", old_run(1.0, 91.5, 91.5))
    write(root, "f", rec("mobilenet_v2", 0.5, 32, "float", 0, 91.0, 4.0))
    result = write_report(root, tmp_path / "report")
    table = result["fidelity"]
    assert table["engine"].tolist() == ["torch_native_x86"] * 2  # the engine of the record's own latency
    assert table["int"].tolist() == [90.2, 91.5] and table["agreement_with_sim"].tolist() == [97.5, 97.5]
    assert table["max_abs_diff"].tolist() == [3.0, 3.0] and table["target"].isna().all()
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "## Integer engines vs the simulated model" in md and "Host unknown — target not recorded." in md
    assert gap_table(result["table"])["config"].tolist() == ["w0.5 r32 w8a8 qat · torch_native_x86",
                                                             "w1.0 r32 w8a8 qat · torch_native_x86"]
    assert (tmp_path / "report" / "sim_int_gap.png").exists()


def test_real_units_and_detection_engines(store: Path, tmp_path: Path) -> None:
    real = {"status": "ok", "top1": 69.0, "agreement_with_sim": 96.0, "logit_diff_unit": "real",
            "logit_max_abs_diff": 0.125, "logit_mean_abs_diff": 0.01}
    record = run(2, real, real)
    record["model"]["width_mult"] = 1.0
    write(store, "real", record)
    det = rec("ssdlite_mobilenet_v2", 0.5, 320, "qat", 0, 0.0, 12.0)
    det["accuracy"] = {"map": 16.2, "int_map": 16.2, "sim_map": 16.5, "float_map": 16.7}
    det["fidelity"] = {"primary_engine": "torch_native_x86", "engines": {
        "torch_native_x86": {"status": "ok", "map": 16.2, "core_max_abs_diff_lsb": 2.0, "core_mean_abs_diff_lsb": 0.1,
                             "core_within_1lsb": 95.0},
        "reference": {"status": "ok", "map": 16.4, "core_max_abs_diff_lsb": 1.0, "core_mean_abs_diff_lsb": 0.05,
                      "core_within_1lsb": 99.0}}}
    write(store, "det", det)
    rows = engine_rows(table_of(store))
    detection = rows[rows["metric_name"] == "map"].set_index("engine")
    assert detection["int"].to_dict() == {"torch_native_x86": 16.2, "reference": 16.4}
    assert detection.loc["reference", "within_1lsb"] == 99.0 and detection.loc["reference", "unit"] == "lsb"
    assert rows.loc[rows["unit"] == "real", "max_abs_diff"].tolist() == [0.125, 0.125]
    write_report(store, tmp_path / "r")
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "| 0.125 real | 0.01 real |" in md and "int top-1 / COCO mAP (%)" in md


def test_latency_rows_of_one_run_count_once(store: Path) -> None:
    records = table_of(store)
    twice = pd.concat([records, records.assign(**{"latency.engine": "tflite", "latency.source": "phone.json"})])
    assert engine_fidelity_table(twice)["n"].tolist() == [2, 2, 2]
    assert gap_table(twice)["n"].tolist() == [2, 2]
