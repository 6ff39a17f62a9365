"""Analysis layer on hand-built records: seed aggregation, latency join, budget queries, paper tables, figures."""

from __future__ import annotations

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

from qat.analysis import (
    aggregate_seeds,
    build_table,
    fastest_within,
    join_latency,
    load_latency_records,
    load_records,
    most_accurate_under,
    pareto_by,
)
from qat.analysis.comparisons import gap_table, method_table, plot_methods, plot_sim_int_gap
from qat.analysis.heatmap import bit_grid, has_bit_grid, plot_bit_heatmap
from qat.analysis.plots import plot_tradeoff
from qat.analysis.report import configurations, write_paper_table, write_report
from qat.analysis.stats import t_interval
from qat.analysis.tables import to_latex, to_markdown, write_table
from qat.errors import QatError

REPO = Path(__file__).resolve().parents[1]
# Student t quantiles at 0.975 in closed form: 2 degrees of freedom (2p-1)·sqrt(2 / (4p(1-p))), 1: tan(π(p-1/2))
T_975_2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
T_975_1 = math.tan(math.pi * 0.475)


def rec(arch: str, width: float, res: int, method: str, seed: int, top1: float, ms: float | None, *,
        bits: tuple[int, int] = (8, 8), per_channel: bool = True, symmetric: bool = True, classes: int = 1000,
        engine: str = "torch_native_x86", sim: float | None = None, **extra: Any) -> dict[str, Any]:
    """A record as qat/pipeline.py writes it (with the coming ``method`` field)."""
    is_float = method == "float"
    record: dict[str, Any] = {
        "schema": "qat.record/1", "model_id": f"{arch}-w{width}-r{res}-{method}-{bits[0]}{bits[1]}-s{seed}",
        "seed": seed, "method": method, "experiment": "test",
        "model": {"arch": arch, "width_mult": width, "resolution": res, "num_classes": classes},
        "data": {"name": "imagefolder", "num_classes": classes},
        "quant": {"precision": "float", "weight_bits": 32, "act_bits": 32} if is_float else {
            "precision": "int8", "weight_bits": bits[0], "act_bits": bits[1], "weight_per_channel": per_channel,
            "weight_symmetric": symmetric},
        "accuracy": {"top1": top1, "float_top1": top1} if is_float else {"top1": top1, "int_top1": top1},
    }  # fmt: skip
    if sim is not None:
        record["accuracy"]["sim_top1"] = sim
    if ms is not None:
        record["latency"] = {"engine": "torch_eager" if is_float else engine, "device": "cpu", "threads": 1,
                             "batch": 1, "median_ms": ms}
    return {**record, **extra}


def write(root: Path, name: str, content: Any, filename: str = "record.json") -> Path:
    path = root / name / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """ResNet-50 at 224 on ImageNet-1k: float (2 seeds), QAT w8a8 (3 seeds), PTQ w8a8 (1 seed),
    QAT w4a8 (1 seed); a separate latency file from a phone; one corrupt record, one bad latency file."""
    root = tmp_path / "store"
    r50 = ("resnet50", 1.0, 224)
    write(root, "f0", rec(*r50, "float", 0, 76.0, 40.0))
    write(root, "f1", rec(*r50, "float", 1, 76.4, 42.0))
    for seed, top1, ms, sim in ((0, 74.0, 20.0, 74.5), (1, 75.0, 22.0, 75.0), (2, 76.0, 21.0, 76.0)):
        write(root, f"q{seed}", rec(*r50, "qat", seed, top1, ms, sim=sim))
    write(root, "p0", rec(*r50, "ptq_minmax", 0, 73.0, 20.5, sim=73.0))
    write(root, "w4", rec(*r50, "qat", 0, 70.0, 19.0, bits=(4, 8), sim=70.2))
    write(root, "bad", '{"schema": "qat.record/1", ')
    phone = [{"schema": "qat.latency/1", "model_id": "resnet50-w1.0-r224-qat-88-s0", "engine": "tflite",
              "device": "pixel7", "threads": 1, "batch": 1, "median_ms": 9.0, "p10_ms": 8.5, "p90_ms": 9.6, "n": 50},
             {"schema": "qat.latency/1", "model_id": "resnet50-w1.0-r224-qat-88-s0", "engine": "tflite",
              "device": "pixel7", "median_ms": -1}]
    write(root, "phone", phone, "latency-pixel7.json")
    write(root, "broken", "[{", "latency.json")
    return root


def joined(store: Path) -> pd.DataFrame:
    records, _ = load_records(store)
    latency, _ = load_latency_records(store)
    return join_latency(records, latency)


def test_t_interval_exact() -> None:
    mean, std, half, n = t_interval([74.0, 75.0, 76.0])
    assert (mean, std, n) == (75.0, 1.0, 3)
    assert half == pytest.approx(T_975_2 * 1.0 / math.sqrt(3), rel=1e-12)
    one_mean, one_std, one_half, one_n = t_interval([5.0])
    assert (one_mean, one_n) == (5.0, 1) and math.isnan(one_std) and math.isnan(one_half)
    assert t_interval([math.nan, 2.0, 4.0])[3] == 2 and t_interval([])[3] == 0


def test_load_and_join_with_separate_latency_records(store: Path) -> None:
    records, skipped = load_records(store)
    assert len(records) == 7 and [p.parent.name for p, _ in skipped] == ["bad"]
    assert set(records["method"]) == {"float", "qat", "ptq_minmax"} and set(records["metric_name"]) == {"top1"}
    latency, bad = load_latency_records(store)
    assert latency["latency.median_ms"].tolist() == [9.0] and latency["latency.device"].tolist() == ["pixel7"]
    assert sorted(str(p).rsplit("/", 1)[-1] for p, _ in bad) == ["latency-pixel7.json#1", "latency.json"]
    table = join_latency(records, latency)
    assert len(table) == 8  # 7 embedded measurements + the phone measurement of qat seed 0
    phone = table[table["latency.device"] == "pixel7"]
    assert phone["model_id"].tolist() == ["resnet50-w1.0-r224-qat-88-s0"]
    assert phone["accuracy.top1"].tolist() == [74.0] and phone["latency.engine"].tolist() == ["tflite"]
    assert (table["latency.source"] == "record").sum() == 7


def test_join_keeps_records_without_latency(tmp_path: Path) -> None:
    write(tmp_path, "a", rec("resnet50", 1.0, 224, "float", 0, 76.0, None))
    records, _ = load_records(tmp_path)
    table = join_latency(records)
    assert len(table) == 1 and table["accuracy.top1"].tolist() == [76.0] and table["latency.source"].isna().all()


def test_detection_records_use_map(tmp_path: Path) -> None:
    det = rec("ssdlite_mobilenet_v2", 0.5, 320, "qat", 0, 0.0, 12.0)
    det["accuracy"] = {"map": 16.2, "float_map": 16.7}
    det["data"] = {"name": "coco", "num_classes": 80}
    write(tmp_path, "det", det)
    write(tmp_path, "cls", rec("resnet50", 1.0, 224, "float", 0, 76.0, 40.0))
    records, skipped = load_records(tmp_path)
    assert not skipped
    by_task = records.set_index("task")
    assert by_task.loc["detection", "metric"] == 16.2 and by_task.loc["detection", "metric_name"] == "map"
    assert by_task.loc["detection", "metric_float"] == 16.7 and by_task.loc["classification", "metric"] == 76.0


def test_aggregate_seeds_exact(store: Path) -> None:
    summary = aggregate_seeds(joined(store))
    assert len(summary) == 5  # float, qat w8a8 on cpu, qat w8a8 on pixel7, ptq w8a8, qat w4a8
    qat = summary[(summary["method"] == "qat") & (summary["quant.weight_bits"] == 8)
                  & (summary["latency.device"] == "cpu")].iloc[0]
    assert (qat["n"], qat["seeds"]) == (3, "0,1,2")
    assert (qat["metric.mean"], qat["metric.std"], qat["metric.n"]) == (75.0, 1.0, 3)
    assert qat["metric.ci95"] == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-12)
    assert qat["latency.median_ms.mean"] == 21.0 and qat["latency.median_ms.std"] == 1.0
    flt = summary[summary["method"] == "float"].iloc[0]
    assert flt["n"] == 2 and flt["metric.mean"] == pytest.approx(76.2)
    assert flt["metric.std"] == pytest.approx(math.sqrt(0.08)) and flt["metric.ci95"] == pytest.approx(
        T_975_1 * math.sqrt(0.08) / math.sqrt(2))
    single = summary[summary["method"] == "ptq_minmax"].iloc[0]
    assert single["n"] == 1 and math.isnan(single["metric.std"]) and math.isnan(single["metric.ci95"])
    by_arch = aggregate_seeds(joined(store), by=["model.arch"], values=["metric"])
    assert by_arch.columns.tolist() == ["model.arch", "n", "seeds", "metric.mean", "metric.std", "metric.ci95",
                                        "metric.n"]
    assert by_arch["n"].tolist() == [8]
    with pytest.raises(KeyError):
        aggregate_seeds(joined(store), values=["no.such"])


def test_pareto_per_device_exact(store: Path) -> None:
    summary = configurations(joined(store))
    front = summary[summary["pareto"]]
    cpu = front[front["latency.device"] == "cpu"]
    # cpu: w4a8 (19 ms, 70.0), ptq (20.5 ms, 73.0), qat w8a8 (21 ms, 75.0), float (41 ms, 76.2): all on it
    # qat w8a8 ran on two engines, so its series names the engine
    assert sorted(cpu["series"]) == ["float", "ptq_minmax w8a8", "qat w4a8", "qat w8a8 · torch_native_x86"]
    assert front[front["latency.device"] == "pixel7"]["series"].tolist() == ["qat w8a8 · tflite"]
    df = pd.DataFrame({"latency.device": ["a", "a", "b"], "latency.median_ms": [1.0, 2.0, 5.0],
                       "accuracy.top1": [80.0, 79.0, 10.0]})
    assert pareto_by(df).tolist() == [True, False, True]


def test_budget_queries_exact(store: Path) -> None:
    table = joined(store)
    best = most_accurate_under(table, 21.0)
    assert best[["latency.engine", "latency.device", "model_id"]].values.tolist() == [
        ["tflite", "pixel7", "resnet50-w1.0-r224-qat-88-s0"],
        ["torch_native_x86", "cpu", "resnet50-w1.0-r224-qat-88-s2"],  # 76.0 at 21 ms beats 74.0 at 20 ms
    ]
    assert most_accurate_under(table, 21.0, engine="torch_eager").empty  # float takes 40+ ms
    assert most_accurate_under(table, 41.0, engine="torch_eager")["accuracy.top1"].tolist() == [76.0]
    summary = configurations(table)
    per_config = most_accurate_under(summary, 20.9, device="cpu")
    assert per_config["series"].tolist() == ["ptq_minmax w8a8"]  # qat w8a8 means 21 ms: over budget
    # float baseline 76.2 (mean of the two float runs): within 1.5 points -> 74.7 or better
    fast = fastest_within(table, 1.5, engine="torch_native_x86")
    assert fast["model_id"].tolist() == ["resnet50-w1.0-r224-qat-88-s2"]  # ≥ 74.7: 76.0 at 21 ms, 75.0 at 22
    assert fast["drop"].tolist() == pytest.approx([0.2])
    fast = fastest_within(table, 2.5, engine="torch_native_x86")  # ≥ 73.7: 74.0 at 20 ms
    assert fast["model_id"].tolist() == ["resnet50-w1.0-r224-qat-88-s0"]
    fast = fastest_within(summary, 1.5, device="cpu")
    assert fast["series"].tolist() == ["float", "qat w8a8 · torch_native_x86"]
    assert fast["drop"].tolist() == pytest.approx([0, 1.2])
    assert fastest_within(summary, 3.5, engine="torch_native_x86")["series"].tolist() == ["ptq_minmax w8a8"]
    assert fastest_within(summary, 6.5, engine="torch_native_x86")["series"].tolist() == ["qat w4a8"]
    assert fastest_within(table, 0.0, baseline=76.0, engine="torch_native_x86")["model_id"].tolist() == [
        "resnet50-w1.0-r224-qat-88-s2"]
    with pytest.raises(ValueError):
        fastest_within(table, 1.0, baseline="median")


def test_paper_table_cells_exact_and_missing(store: Path) -> None:
    table = build_table(joined(store), "jacob2018_table4_1", where={"latency.device": "cpu"})
    assert table["model"].tolist() == ["resnet50", "resnet50", "resnet100", "resnet100", "resnet150",
                                       "resnet150"]
    r50f, r50q = table.iloc[0], table.iloc[1]
    assert (r50f["top-1 paper"], r50f["top-1 n"]) == (76.4, 2)
    assert r50f["top-1 ours"] == pytest.approx(76.2) and r50f["top-1 Δ"] == pytest.approx(-0.2)
    assert (r50q["top-1 ours"], r50q["top-1 std"], r50q["top-1 n"]) == (75.0, 1.0, 3)
    assert r50q["top-1 Δ"] == pytest.approx(0.1)
    missing = table.iloc[2:]  # ResNet-100/150: no run, never filled in
    assert (missing["top-1 n"] == 0).all() and missing["top-1 ours"].isna().all() and missing["top-1 Δ"].isna().all()
    md = to_markdown(table, "jacob2018_table4_1")
    assert "| resnet50 | int8_qat | 8 | 8 | 74.9 | 75.00 ± 1.00 | +0.10 | 3 |" in md
    assert "| resnet100 | float | 32 | 32 | 78.0 | — | — | 0 |" in md
    assert r"resnet100 & float & 32 & 32 & 78.0 & --- & --- & 0 \\" in to_latex(table, "jacob2018_table4_1")


def test_paper_table_matching_rules(store: Path) -> None:
    data = joined(store)
    table = build_table(data, "whitepaper2018_table4_5_6", where={"latency.device": "cpu"})
    row = table[(table["model"] == "resnet_v1_50") & (table["weight_bits"] == 8)
                & (table["granularity_symmetry"] == "sym_per_channel")].iloc[0]
    assert (row["top-1 paper"], row["top-1 ours"], row["top-1 n"]) == (75.0, 75.0, 3)  # fraction -> percent
    assert row["top-1 Δ"] == pytest.approx(0.0)
    asym = table[(table["model"] == "resnet_v1_50") & (table["granularity_symmetry"] == "asym_per_layer")]
    assert asym["top-1 n"].tolist() == [0, 0]  # our runs are symmetric per-channel
    ptq4 = table[(table["model"] == "resnet_v1_50") & (table["method"] == "ptq") & (table["weight_bits"] == 4)]
    assert ptq4["top-1 n"].tolist() == [0, 0]  # no 4-bit PTQ run
    ptq = build_table(data, "whitepaper2018_table2_3", where={"latency.device": "cpu"})
    ptq = ptq[(ptq["model"] == "resnet_v1_50") & (ptq["quantized"] == "weights+activations")].set_index(
        "granularity_symmetry")
    assert ptq["top-1 n"].to_dict() == {"asym_per_layer": 0, "sym_per_channel": 1, "asym_per_channel": 0}
    assert ptq.loc["sym_per_channel", "top-1 ours"] == 73.0
    assert ptq.loc["sym_per_channel", "top-1 Δ"] == pytest.approx(73.0 - 75.1)
    demo = rec("resnet50", 1.0, 224, "float", 0, 60.0, 1.0, classes=10)
    records, _ = load_records(write(store.parent / "demo", "x", demo))
    assert build_table(records, "jacob2018_table4_1")["top-1 n"].tolist()[0] == 0  # 10 classes: not ImageNet
    assert build_table(records, "jacob2018_table4_1", dataset_filter=False)["top-1 n"].tolist()[0] == 1
    grid = build_table(data, "jacob2018_table4_7", where={"latency.device": "cpu"})
    cell = grid[(grid["weight_bits"] == 4) & (grid["act_bits"] == 8)].iloc[0]
    assert cell["change vs float ours"] == pytest.approx(70.0 - 76.2) and cell["change vs float n"] == 1


def test_write_paper_table_files(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = write_paper_table("jacob2018_table4_2", store, tmp_path / "tables", where={"latency.device": "cpu"})
    assert [p.name for p in result["paths"]] == ["jacob2018_table4_2.md", "jacob2018_table4_2.tex",
                                                 "jacob2018_table4_2.csv"]
    with open(tmp_path / "tables" / "jacob2018_table4_2.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["top-1 n"] for r in rows] == ["0", "0", "0", "0", "3"]
    assert rows[0]["top-1 ours"] == "" and rows[4]["top-1 ours"] == "75.0"  # missing stays empty in CSV
    assert "integer-only (Jacob et al.)" in capsys.readouterr().out
    with pytest.raises(QatError) as info:
        write_paper_table("jacob2018_table9", store, tmp_path / "none")
    assert info.value.key == "table" and "whitepaper2018_table4_5_6" in str(info.value)
    assert not (tmp_path / "none").exists()
    write_table(result["table"], "jacob2018_table4_2", tmp_path / "again")
    assert not [p for p in (tmp_path / "again").iterdir() if p.name.startswith(".")]


def assert_not_blank(path: Path) -> None:
    pixels = imread(path)
    assert pixels[..., :3].var() > 0.005
    assert (pixels[..., :3].mean(axis=2) < 0.5).mean() > 0.002  # some dark ink: text, axes


def test_figures_written_and_not_blank(store: Path, tmp_path: Path) -> None:
    table = joined(store)
    summary = configurations(table)
    paths = plot_tradeoff(summary, tmp_path / "t", x="latency.median_ms.mean", y="metric.mean", series="series",
                          yerr="metric.ci95", panel="latency.device")
    assert [p.name for p in paths] == ["t.png", "t.pdf"] and paths[1].read_bytes().startswith(b"%PDF")
    assert_not_blank(paths[0])
    assert imread(paths[0]).shape[1] > 1500  # two device panels side by side
    assert has_bit_grid(table)
    panels = {title: rest for title, *rest in bit_grid(table)}
    assert sorted(panels) == ["resnet50 w1.0 r224 · ptq_minmax", "resnet50 w1.0 r224 · qat"]
    mean, count, delta = panels["resnet50 w1.0 r224 · qat"]
    assert mean.index.tolist() == [8, 4] and mean.columns.tolist() == [8]
    assert count.loc[8, 8] == 4 and delta.loc[4, 8] == pytest.approx(70.0 - 76.2)  # 3 cpu runs + 1 phone
    assert_not_blank(plot_bit_heatmap(table, tmp_path / "h")[0])
    methods = method_table(table)
    assert set(methods["method"]) == {"float", "qat", "ptq_minmax"}
    assert_not_blank(plot_methods(table, tmp_path / "m")[0])
    gaps = gap_table(table[table["latency.device"] == "cpu"]).set_index("config")
    assert gaps.loc["w1.0 r224 w8a8 qat · torch_native_x86", "mean"] == pytest.approx(-0.5 / 3)
    assert gaps.loc["w1.0 r224 w4a8 qat · torch_native_x86", "mean"] == pytest.approx(-0.2)
    assert_not_blank(plot_sim_int_gap(table, tmp_path / "g")[0])


def test_write_report_writes_every_figure_and_budgets(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = write_report(store, out, latency_budget_ms=21.0, accuracy_drop=1.5)
    assert {p.name for p in result["plots"]} == {f"{stem}.{ext}" for stem in ("tradeoff", "bits_heatmap",
                                                 "methods", "sim_int_gap") for ext in ("png", "pdf")}
    md = (out / "summary.md").read_text()
    assert "## Most accurate under 21 ms (per engine and device)" in md and "![bits_heatmap](bits_heatmap.png)" in md
    assert "## Skipped 3 record(s)" in md
    summary = pd.read_csv(out / "summary.csv")
    assert summary["n"].sum() == 8 and {"metric.mean", "metric.ci95", "metric.n"} <= set(summary.columns)


@pytest.mark.slow
def test_report_table_app(store: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(REPO / "experiments" / "report.py"), "table=jacob2018_table4_1",
               f"records={store}", "out=tables", "where={latency.device: cpu}"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| resnet50 | int8_qat | 8 | 8 | 74.9 | 75.00 ± 1.00 | +0.10 | 3 |" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "jacob2018_table4_1.csv", "jacob2018_table4_1.md", "jacob2018_table4_1.tex"]
