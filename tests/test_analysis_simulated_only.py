"""Simulated-only runs (no integer model) in the analysis layer: loaded, kept apart from integer runs and marked in
every table and figure, never on a Pareto front or in a budget answer."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import qat.analysis.plots as plots
from qat.analysis import (
    build_table,
    configurations,
    fastest_within,
    join_latency,
    load_records,
    most_accurate_under,
    pareto_front,
    plot_tradeoff,
    to_latex,
    to_markdown,
    write_report,
)
from qat.analysis.comparisons import gap_table, method_table
from qat.analysis.heatmap import bit_grid
from qat.analysis.report import results_table, summary_markdown

V2, V3 = ("mobilenet_v2", 1.0, 224), ("mobilenet_v3_large", 1.0, 224)
REASON = "not convertible: convert: node features_0_2 (Hardswish) has no integer form (use relu/relu6)"


def run(model: tuple[str, float, int], method: str, seed: int, accuracy: dict[str, float],
        median_ms: float | None, **extra: Any) -> dict[str, Any]:
    """A record as qat/pipeline.py writes it."""
    arch, width, res = model
    precision = "float" if method == "float" else "int8"
    return {
        "schema": "qat.record/1", "model_id": f"{arch}-{method}-s{seed}", "status": "ok", "method": method,
        "seed": seed, "experiment": "test",
        "model": {"arch": arch, "width_mult": width, "resolution": res, "num_classes": 1000},
        "data": {"name": "imagefolder", "num_classes": 1000},
        "quant": {"precision": precision, "weight_bits": 32 if precision == "float" else 8,
                  "act_bits": 32 if precision == "float" else 8},
        "accuracy": accuracy,
        "latency": {"engine": "torch_eager" if precision == "float" else "torch_native_x86", "device": "cpu",
                    "threads": 1, "batch": 1, "median_ms": median_ms},
        **extra,
    }  # fmt: skip


SIMULATED = run(V3, "qat", 0, {"sim_top1": 74.5, "sim_top5": 91.0, "float_top1": 75.0, "float_top5": 92.0}, None,
                status="simulated_only", fidelity={"integer_model": REASON})
SIMULATED["latency"] = {"engine": "none (simulated only, no integer model)", "median_ms": None}
# written before the simulated_only status: status ok, the simulated accuracy under accuracy.top1
LEGACY = copy.deepcopy(SIMULATED)
LEGACY.update(status="ok", model_id="mobilenet_v3_large-qat-s1", seed=1)
LEGACY["accuracy"] = {"top1": 74.3, "top5": 90.8, "sim_top1": 74.3, "sim_top5": 90.8, "float_top1": 75.0}


def write(root: Path, name: str, content: dict[str, Any]) -> None:
    path = root / name / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(content))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Float and integer QAT MobileNet v2; float MobileNet v3 and two simulated-only QAT runs of it (hardswish)."""
    root = tmp_path / "store"
    write(root, "v2f", run(V2, "float", 0, {"top1": 72.0, "float_top1": 72.0}, 10.0))
    write(root, "v2q", run(V2, "qat", 0, {"top1": 71.0, "int_top1": 71.0, "sim_top1": 71.2, "float_top1": 72.0},
                           4.0, fidelity={"sim_vs_int_top1_agreement": 99.0}))
    write(root, "v3f", run(V3, "float", 0, {"top1": 75.0, "float_top1": 75.0}, 12.0))
    write(root, "v3s0", SIMULATED)
    write(root, "v3s1", LEGACY)
    return root


def table_of(store: Path) -> pd.DataFrame:
    records, skipped = load_records(store)
    assert skipped == []  # the simulated-only record has no accuracy.top1 and is still valid
    return results_table(join_latency(records))


def test_rows_are_marked_and_integer_columns_hold_no_simulated_number(store: Path) -> None:
    table = table_of(store).set_index("model_id")
    simulated = table["simulated_only"]
    assert simulated.to_dict() == {"mobilenet_v2-float-s0": False, "mobilenet_v2-qat-s0": False,
                                   "mobilenet_v3_large-float-s0": False, "mobilenet_v3_large-qat-s0": True,
                                   "mobilenet_v3_large-qat-s1": True}
    sim = table[simulated]
    assert sim["metric"].isna().all() and sim["accuracy.top1"].isna().all() and sim["accuracy.top5"].isna().all()
    assert sim["metric_sim"].tolist() == [74.5, 74.3] and sim["accuracy.sim_top1"].tolist() == [74.5, 74.3]
    assert (sim["task"] == "classification").all() and (sim["metric_name"] == "top1").all()
    assert sim["metric_float"].tolist() == [75.0, 75.0]
    # against each run's own float model: the simulated metric where no integer model exists
    assert sim["metric_vs_float"].round(6).tolist() == [-0.5, -0.7]
    assert table.loc["mobilenet_v2-qat-s0", "metric"] == 71.0  # integer rows: the integer model's accuracy
    assert table.loc["mobilenet_v2-qat-s0", "metric_sim"] == 71.2
    assert not table.loc[simulated, "pareto"].any()


def test_pareto_excludes_simulated_only_rows(store: Path) -> None:
    table = table_of(store)
    sim = table["simulated_only"]
    # even with a latency and the best accuracy, a simulated-only row is never on the front
    table.loc[sim, "latency.median_ms"] = 1.0
    front = pareto_front(table, y="accuracy.sim_top1")
    assert not front[sim].any()
    assert table.loc[front, "model_id"].tolist() == ["mobilenet_v2-qat-s0"]  # fastest of the rest (sim 71.2)


def test_budget_queries_exclude_simulated_only_rows(store: Path) -> None:
    table = table_of(store)
    sim = table["simulated_only"]
    table.loc[sim, ["latency.median_ms", "latency.engine", "latency.device"]] = [1.0, "torch_native_x86", "cpu"]
    table.loc[sim, "metric"] = 99.0  # were one to fill it in, it still would not count
    best = most_accurate_under(table, 5.0)
    assert best["model_id"].tolist() == ["mobilenet_v2-qat-s0"]
    fastest = fastest_within(table, 2.0)
    assert "mobilenet_v3_large-qat-s0" not in fastest["model_id"].tolist()
    assert fastest.loc[fastest["latency.engine"] == "torch_native_x86", "model_id"].tolist() == ["mobilenet_v2-qat-s0"]
    summary = configurations(table_of(store))
    assert not most_accurate_under(summary, 1000.0)["simulated_only"].any()


def test_summary_keeps_the_simulated_configuration_apart_and_marked(store: Path) -> None:
    summary = configurations(table_of(store))
    sim = summary[summary["simulated_only"].eq(True)]
    assert len(sim) == 1 and int(sim["n"].iloc[0]) == 2  # both runs, pooled over seeds, apart from integer ones
    assert sim["series"].iloc[0] == "qat w8a8 (simulated only)"
    assert np.isnan(sim["metric.mean"].iloc[0]) and sim["metric_sim.mean"].iloc[0] == pytest.approx(74.4)
    assert not sim["pareto"].any()
    md = summary_markdown(summary, [], {}, [])
    header = next(line for line in md.splitlines() if line.startswith("| series"))
    assert "simulated only (%)" in header
    row = next(line for line in md.splitlines() if "(simulated only)" in line and line.startswith("|"))
    assert "74.40" in row
    assert "**simulated only (%)**: the model has no integer form yet" in md


def test_paper_table_marks_simulated_only_cells(store: Path) -> None:
    table = table_of(store)
    both = build_table(table, "jacob2018_table4_7")  # any model: integer v2 and simulated-only v3 at w8a8
    cell = both[(both["weight_bits"] == 8) & (both["act_bits"] == 8)].iloc[0]
    assert cell["change vs float ours"] == pytest.approx(-1.0) and cell["change vs float n"] == 1  # integer only
    assert cell["change vs float simulated-only"] == pytest.approx(-0.6)
    assert cell["change vs float simulated-only n"] == 2
    md = to_markdown(both, "jacob2018_table4_7")
    assert "| 8 | 8 | -0.9 | -1.00; -0.60 ± 0.14† | -0.10 | 1+2† |" in md
    assert "† simulated only: the model has no integer form yet" in md

    only = build_table(table, "jacob2018_table4_7", where={"model.arch": "mobilenet_v3_large"})
    md = to_markdown(only, "jacob2018_table4_7")
    assert "| 8 | 8 | -0.9 | -0.60 ± 0.14† | +0.30† | 0+2† |" in md
    assert "| 8 | 7 | -0.3 | — | — | 0 |" in md  # no run at all: still "—"
    tex = to_latex(only, "jacob2018_table4_7")
    assert r"8 & 8 & -0.9 & -0.60 $\pm$ 0.14$^\dagger$ & +0.30$^\dagger$ & 0+2$^\dagger$ \\" in tex
    assert "†" not in tex and r"$^\dagger$ simulated only" in tex

    integer_only = build_table(table, "jacob2018_table4_7", where={"model.arch": "mobilenet_v2"})
    assert "†" not in to_markdown(integer_only, "jacob2018_table4_7")  # no note without simulated-only runs


def test_top1_paper_table_cell_is_the_simulated_value_marked(tmp_path: Path) -> None:
    root = tmp_path / "store"
    r50 = ("resnet50", 1.0, 224)
    sim = run(r50, "qat", 0, {"sim_top1": 75.5, "float_top1": 76.0}, None, status="simulated_only",
              fidelity={"integer_model": REASON})
    write(root, "sim", sim)
    records, _ = load_records(root)
    table = build_table(join_latency(records), "jacob2018_table4_1")
    row = table[(table["model"] == "resnet50") & (table["scheme"] != "float")].iloc[0]
    assert row["top-1 n"] == 0 and np.isnan(row["top-1 ours"])  # an integer column never holds it
    assert row["top-1 simulated-only"] == 75.5
    assert "75.50†" in to_markdown(table, "jacob2018_table4_1")


def test_plot_draws_simulated_only_as_a_labelled_level(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = configurations(table_of(store))
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or [Path(path)])
    plot_tradeoff(summary, "tradeoff", x="latency.median_ms.mean", y="metric.mean", series="series",
                  yerr="metric.ci95")
    (ax,) = figures[0].axes
    texts = [t.get_text() for t in ax.texts]
    assert "qat w8a8 mobilenet_v3_large w1.0 r224 (simulated only)" in texts
    levels = [line for line in ax.lines if list(line.get_ydata()) == [pytest.approx(74.4)] * 2]
    assert len(levels) == 1 and levels[0].get_linestyle() == ":"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert plots.SIMULATED_LEGEND in legend and not [t for t in legend if t.startswith("qat w8a8 (simulated")]
    points = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines if line not in levels])
    assert not np.isclose(points, 74.4).any()  # never a point on the latency axis


def test_report_writes_marked_outputs(store: Path, tmp_path: Path) -> None:
    result = write_report(store, tmp_path / "report", latency_budget_ms=100.0, accuracy_drop=5.0)
    with open(tmp_path / "report" / "results.csv", newline="") as handle:
        rows = {row["model_id"]: row for row in csv.DictReader(handle)}
    legacy = rows["mobilenet_v3_large-qat-s1"]
    assert legacy["simulated_only"] == "True" and legacy["metric"] == "" and legacy["accuracy.top1"] == ""
    assert legacy["metric_sim"] == "74.3" and legacy["pareto"] == "False"
    for answer in result["budgets"].values():
        assert not answer.empty and not answer["simulated_only"].any()
    md = (tmp_path / "report" / "summary.md").read_text()
    assert "qat w8a8 (simulated only)" in md and "simulated only (%)" in md
    assert (tmp_path / "report" / "tradeoff.png").exists()


def test_comparisons_mark_or_leave_out_simulated_only_runs(store: Path) -> None:
    table = table_of(store)
    methods = method_table(table)
    sim = methods[methods["method"] == "qat (simulated only)"]
    assert sim["mean"].tolist() == [pytest.approx(74.4)] and sim["n"].tolist() == [2]
    assert methods.loc[methods["method"] == "qat", "mean"].tolist() == [71.0]
    assert gap_table(table)["config"].str.contains("mobilenet_v3").sum() == 0
    assert all("mobilenet_v3" not in title for title, *_ in bit_grid(table))
