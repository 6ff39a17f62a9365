"""Records in; out: ``results.csv`` (one row per run and latency measurement), ``summary.csv`` (one row per
configuration: mean, std, 95% CI and n over seeds), ``fidelity.csv`` (per configuration and int8 engine: the
integer model beside the simulated one, :func:`qat.analysis.engines.engine_fidelity_table`), ``summary.md``, the
trade-off plot and, when the data has them, the bit-depth heatmap, the method comparison and the
simulated-vs-integer gap plots.

Simulated-only runs (no integer model: ``simulated_only``) are kept apart and marked everywhere: ``metric`` is
empty for them and ``metric_sim`` holds the simulated accuracy, their series is labelled "(simulated only)", they
are in no Pareto front and no budget answer, ``summary.md`` shows their accuracy in its own column with a note,
and the trade-off plot draws them as dotted accuracy levels (they have no integer latency)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pandas as pd

from qat.analysis.budget import fastest_within, most_accurate_under
from qat.analysis.comparisons import gap_table, has_method_comparison, plot_methods, plot_sim_int_gap
from qat.analysis.engines import bits_label, engine_fidelity_table, host_target_line
from qat.analysis.heatmap import has_bit_grid, plot_bit_heatmap
from qat.analysis.latency import join_latency, load_latency_records
from qat.analysis.pareto import pareto_by
from qat.analysis.plots import METRIC_LABELS, plot_tradeoff
from qat.analysis.records import load_records, simulated_mask
from qat.analysis.stats import aggregate_seeds
from qat.analysis.tables import build_table, get_table, to_markdown, write_table
from qat.errors import QatError
from qat.records import atomic_write_bytes

CORE_COLUMNS = (
    "model_id", "model.arch", "model.width_mult", "model.resolution",
    "method", "quant.precision", "quant.weight_bits", "quant.act_bits",
    "metric_name", "metric", "simulated_only", "metric_sim",
    "accuracy.top1", "accuracy.float_top1", "accuracy.sim_top1", "accuracy.int_top1",
    "latency.engine", "latency.device", "latency.threads", "latency.median_ms", "latency.p10_ms", "latency.p90_ms",
    "latency.source",
)  # fmt: skip
"""Always present in ``results.csv``, in this order (empty where no record has them), then ``pareto``,
then every other record field in alphabetical order."""

INTEGER_COLUMNS = (
    "seed", "model.resolution", "model.num_classes", "model.params", "model.macs", "data.val_size",
    "quant.weight_bits", "quant.act_bits", "latency.threads", "latency.batch", "latency.n", "latency.warmup",
)  # fmt: skip
"""Written as integers even where some records lack them (no ``32.0``)."""

SUMMARY_COLUMNS = ("model_id", "method", "quant.precision", "metric", "simulated_only", "metric_sim", "latency.engine",
                   "latency.median_ms", "pareto")


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """The tidy table: core columns first, a ``pareto`` flag, then the remaining fields."""
    table = df.copy()
    for column in CORE_COLUMNS:
        if column not in table.columns:
            table[column] = pd.NA
    table["pareto"] = pareto_by(table, ("task", "latency.device"), y="metric")
    rest = sorted(c for c in table.columns if c not in CORE_COLUMNS and c != "pareto")
    table = table[[*CORE_COLUMNS, "pareto", *rest]]
    for column in INTEGER_COLUMNS:
        if column in table.columns:
            with contextlib.suppress(TypeError, ValueError):  # not all integral: leave as is
                table[column] = table[column].astype("Int64")
    return table


MODEL_KEYS = ("model.arch", "model.width_mult", "model.resolution")


def precision_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model size: float vs int8 top-1 and latency, the drop and the int8 speed-up.

    Float and int8 rows are paired on architecture, width and resolution (mean over seeds/repeats).
    """
    needed = [*MODEL_KEYS, "quant.precision", "accuracy.top1", "latency.median_ms"]
    if any(c not in table.columns for c in needed):
        return pd.DataFrame()
    data = table[needed].copy()
    data["accuracy.top1"] = pd.to_numeric(data["accuracy.top1"], errors="coerce")
    data["latency.median_ms"] = pd.to_numeric(data["latency.median_ms"], errors="coerce")
    wide = data.groupby([*MODEL_KEYS, "quant.precision"], dropna=False).mean(numeric_only=True).unstack()
    if ("accuracy.top1", "float") not in wide.columns or ("accuracy.top1", "int8") not in wide.columns:
        return pd.DataFrame()
    pairs = pd.DataFrame({
        "float_top1": wide[("accuracy.top1", "float")], "int8_top1": wide[("accuracy.top1", "int8")],
        "float_ms": wide[("latency.median_ms", "float")], "int8_ms": wide[("latency.median_ms", "int8")],
    })  # fmt: skip
    pairs["top1_drop"] = pairs["float_top1"] - pairs["int8_top1"]
    pairs["int8_speedup"] = pairs["float_ms"] / pairs["int8_ms"]
    return pairs.dropna().reset_index().rename(columns=lambda c: c.split(".")[-1])


def series_labels(df: pd.DataFrame) -> pd.Series:
    """Trade-off series per row: ``float`` or ``<method> w<W>a<A>``, plus `` · <engine>`` when one such
    series was measured on more than one engine, and `` (simulated only)`` for runs without an integer model."""
    def base(row: pd.Series) -> str:
        method = str(row.get("method", row.get("quant.precision", "?")))
        bits = bits_label(row)
        if method == "float" or bits == "?":
            return method
        learned = any(str(row.get(f"quant.{k}_observer", "")).startswith("lsq") for k in ("weight", "act"))
        return f"{method} {bits}" + (" lsq" if learned else "")

    names = df.apply(base, axis=1) if len(df) else pd.Series(dtype=str)
    if names.empty:
        return names
    simulated = simulated_mask(df)
    if "latency.engine" in df.columns:  # simulated-only runs have no integer engine: they name none
        engines = df["latency.engine"].map(str)
        counts = engines[~simulated].groupby(names[~simulated]).nunique()
        several = names.map(counts).fillna(0).gt(1) & ~simulated
        names = names.where(~several, names + " · " + engines)
    return names.where(~simulated, names + SIMULATED_SUFFIX)


def configurations(table: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (seeds pooled, :func:`qat.analysis.aggregate_seeds`), with ``series`` and a
    per-(task, device) ``pareto`` flag on the means."""
    summary = aggregate_seeds(table)
    summary["series"] = series_labels(summary)
    if "latency.median_ms.mean" in summary.columns:
        summary["pareto"] = pareto_by(summary, ("task", "latency.device"), "latency.median_ms.mean", "metric.mean")
    return summary


def _markdown_table(frame: pd.DataFrame) -> str:
    def text(value: object) -> str:
        if isinstance(value, float):
            return "—" if pd.isna(value) else f"{value:.2f}"
        return "—" if value is None or value is pd.NA else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


SIMULATED_SUFFIX = " (simulated only)"
SIMULATED_COLUMN = "simulated only (%)"

SUMMARY_MD_COLUMNS = {
    "series": "series", "model.arch": "arch", "model.width_mult": "width", "model.resolution": "resolution",
    "latency.engine": "engine", "latency.device": "device", "n": "n", "metric.mean": "accuracy (%)",
    "metric.ci95": "± 95% CI", "latency.median_ms.mean": "latency (ms)", "pareto": "Pareto",
}  # fmt: skip


SIMULATED_NOTE = ("the model has no integer form yet (the reason is in its record's "
                  "`fidelity.integer_model`), so its accuracy is the simulated model's, not an integer model's; it has "
                  "no integer latency and is in no Pareto front or budget answer.")


FIDELITY_TITLE = "Integer engines vs the simulated model"
FIDELITY_MD_COLUMNS = {
    "configuration": "configuration", "engine": "engine", "status": "status", "n": "n", "int": "int",
    "agreement_with_sim": "top-1 agreement with simulated (%)", "max_abs_diff": "max abs Δ output (LSB)",
    "mean_abs_diff": "mean abs Δ output (LSB)", "within_1lsb": "within 1 LSB (%)", "target": "target",
    "host_flags": "host flags",
}  # fmt: skip
FIDELITY_NOTE = ("Per configuration (means over its n runs) and int8 engine: the integer model's accuracy on the "
                 "engine, the share of images whose top-1 class is the simulated model's, and the largest and mean "
                 "absolute difference of the outputs (logits; the detector core's for detection) from the simulated "
                 "model's, in output LSBs (`real`: in real units, the model has no output quantizer). Also in "
                 "`fidelity.csv`.")


def fidelity_markdown(fidelity: pd.DataFrame, host: str) -> list[str]:
    """The ``summary.md`` section of :func:`qat.analysis.engines.engine_fidelity_table`: unsupported engines
    show why, differences in real units are marked ``real``; ``host`` (the host and target line) heads it."""
    names = [METRIC_LABELS.get(m, str(m)) for m in dict.fromkeys(fidelity["metric_name"])]
    shown = fidelity.assign(status=[f"{s}: {r}" if isinstance(r, str) else s
                                    for s, r in zip(fidelity["status"], fidelity["reason"], strict=True)])
    real = shown["unit"].eq("real")
    for column in ("max_abs_diff", "mean_abs_diff"):
        shown[column] = shown[column].astype(object).where(~real, shown[column].map(lambda v: f"{v:.3g} real"))
    columns = {**FIDELITY_MD_COLUMNS, "int": f"int {' / '.join(names)} (%)"}
    about = f" {host[:1].upper()}{host[1:]}." if host else ""
    return [f"## {FIDELITY_TITLE}", "", FIDELITY_NOTE + about, "",
            _markdown_table(shown[list(columns)].rename(columns=columns)), ""]


SUBSET_COLUMN = "validation images"
SUBSET_NOTE = ("`subset N (seed s)`: the run's accuracies are over a seeded, class-stratified subset of N validation "
               "images (`data.val_max_images`, `data.val_subset_seed`; the record's `data.val_subset`), not over "
               "the whole validation set; compare them only with runs of the same subset.")


def _subset_column(summary: pd.DataFrame) -> pd.Series | None:
    """``all`` or ``subset N (seed s)`` per configuration, when any was evaluated on a validation subset."""
    if "data.val_subset.images" not in summary.columns:
        return None
    images = pd.to_numeric(summary["data.val_subset.images"], errors="coerce")
    if images.isna().all():
        return None
    seeds = summary.get("data.val_subset.seed", pd.Series(pd.NA, index=summary.index))
    seeds = pd.to_numeric(seeds, errors="coerce")
    return pd.Series(["all" if pd.isna(n) else f"subset {int(n)} (seed {int(seed)})"
                      for n, seed in zip(images, seeds, strict=True)], index=summary.index)


def summary_markdown(summary: pd.DataFrame, skipped: list[tuple[Path, str]], budgets: dict[str, pd.DataFrame],
                     plots: list[Path], *, fidelity: pd.DataFrame | None = None, host: str = "") -> str:
    """``summary.md``: the configurations, budget answers, the int8 engines beside the simulated model (when
    ``fidelity`` has rows), skipped records and the figures written; simulated-only configurations have their
    accuracy in a column of its own and a note."""
    columns = {k: v for k, v in SUMMARY_MD_COLUMNS.items() if k in summary.columns}
    names = sorted(summary["task"].dropna().unique()) if "task" in summary.columns else []
    shown = summary.copy()
    simulated = simulated_mask(shown)
    if simulated.any() and "metric_sim.mean" in shown.columns:
        shown[SIMULATED_COLUMN] = pd.to_numeric(shown["metric_sim.mean"], errors="coerce").where(simulated)
        keys = list(columns)
        at = keys.index("metric.ci95") + 1 if "metric.ci95" in keys else len(keys)
        columns = {k: columns.get(k, k) for k in [*keys[:at], SIMULATED_COLUMN, *keys[at:]]}
    subset = _subset_column(shown)
    if subset is not None:
        shown[SUBSET_COLUMN] = subset
        keys = list(columns)
        at = keys.index("n") if "n" in keys else len(keys)
        columns = {k: columns.get(k, k) for k in [*keys[:at], SUBSET_COLUMN, *keys[at:]]}
    lines = ["# Report", "", f"{int(summary['n'].sum())} run(s), {len(summary)} configuration(s); accuracy = "
             f"{', '.join('top-1' if t == 'classification' else 'COCO mAP' for t in names) or 'top-1'}, mean over "
             "seeds ± half-width of the 95% Student-t interval (— when n = 1); latency = median ms.", "",
             _markdown_table(shown[list(columns)].rename(columns=columns)), ""]
    if SIMULATED_COLUMN in columns:
        lines += [f"**{SIMULATED_COLUMN}**: {SIMULATED_NOTE}", ""]
    if SUBSET_COLUMN in columns:
        lines += [f"**{SUBSET_COLUMN}**: {SUBSET_NOTE}", ""]
    for title, answer in budgets.items():
        lines += [f"## {title}", ""]
        if answer.empty:
            lines += ["No configuration meets the budget.", ""]
            continue
        keep = {k: v for k, v in {**columns, "drop": "drop"}.items() if k in answer.columns and k != "pareto"}
        lines += [_markdown_table(answer[list(keep)].rename(columns=keep)), ""]
    if fidelity is not None and not fidelity.empty:
        lines += fidelity_markdown(fidelity, host)
    if skipped:
        lines += [f"## Skipped {len(skipped)} record(s)", ""] + [f"- `{path}`: {reason}" for path, reason in skipped]
        lines.append("")
    if plots:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in plots if p.suffix == ".png"] + [""]
    return "\n".join(lines)


def _budgets(summary: pd.DataFrame, latency_ms: float | None, drop: float | None) -> dict[str, pd.DataFrame]:
    answers = {}
    if latency_ms is not None and "latency.median_ms.mean" in summary.columns:
        answers[f"Most accurate under {latency_ms:g} ms (per engine and device)"] = most_accurate_under(
            summary, latency_ms)
    if drop is not None and "latency.median_ms.mean" in summary.columns:
        answers[f"Fastest within {drop:g} points of its float model (per engine and device)"] = fastest_within(
            summary, drop)
    return answers


def _print_summary(
    table: pd.DataFrame, skipped: list[tuple[Path, str]], written: list[Path], budgets: dict[str, pd.DataFrame]
) -> None:
    summary = table[list(SUMMARY_COLUMNS)].rename(columns=lambda c: c.split(".")[-1])
    print(f"{len(table)} record(s):")
    print(summary.to_string(index=False))
    if skipped:
        print(f"skipped {len(skipped)} record(s):")
        for path, reason in skipped:
            print(f"  {path}: {reason}")
    pairs = precision_pairs(table)
    if not pairs.empty:
        print("float vs int8 per model size:")
        print(pairs.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    for title, answer in budgets.items():
        print(f"{title}:")
        shown = [c for c in ("latency.engine", "latency.device", "series", "model.width_mult", "metric.mean",
                             "latency.median_ms.mean", "drop") if c in answer.columns]
        print(answer[shown].to_string(index=False) if not answer.empty else "  none")
    for path in written:
        print(f"wrote {path}")


def load_store(records_root: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Run records and separate latency records under ``records_root``, joined (one row per run and
    measurement). Raises :class:`QatError` (``records``) if the root is missing or has no valid record."""
    root = Path(records_root)
    try:
        frame, skipped = load_records(root)
        latency, skipped_latency = load_latency_records(root)
    except FileNotFoundError:
        fix = "pass records=<directory of runs>"
        raise QatError("records", f"{root} does not exist", fix) from None
    if frame.empty:
        why = f"{len(skipped)} record.json file(s), none valid" if skipped else "no record.json found"
        raise QatError("records", f"{why} under {root}", "point records= at finished runs") from None
    return join_latency(frame, latency), skipped + skipped_latency


def _figures(table: pd.DataFrame, summary: pd.DataFrame, out: Path) -> list[Path]:
    """Every figure the data supports (see the module doc)."""
    plots: list[Path] = []
    if pd.to_numeric(summary.get("latency.median_ms.mean"), errors="coerce").gt(0).any():
        devices = summary["latency.device"].nunique() if "latency.device" in summary.columns else 1
        plots += plot_tradeoff(summary, out / "tradeoff", x="latency.median_ms.mean", y="metric.mean",
                               series="series", yerr="metric.ci95", xerr="latency.median_ms.ci95",
                               panel="latency.device" if devices > 1 else None, host=host_target_line(table))
    if has_bit_grid(table):
        plots += plot_bit_heatmap(table, out / "bits_heatmap")
    if has_method_comparison(table):
        plots += plot_methods(table, out / "methods")
    if not gap_table(table).empty:
        plots += plot_sim_int_gap(table, out / "sim_int_gap")
    return plots


def write_report(
    records_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    latency_budget_ms: float | None = None,
    accuracy_drop: float | None = None,
) -> dict[str, Any]:
    """Read ``records_root`` (run records and ``latency*.json``); write in ``out_dir``: ``results.csv``
    (per run and measurement), ``summary.csv`` (per configuration over seeds), ``fidelity.csv`` (per
    configuration and int8 engine, when there are quantized runs), ``summary.md`` and the figures the data
    supports: ``tradeoff`` (when any latency), ``bits_heatmap`` (≥ 2 bit settings of one model), ``methods`` (≥ 2
    quantization methods at one setting), ``sim_int_gap`` (simulated and integer accuracy, per engine), each as
    PNG and PDF. With a latency budget (ms) or an accuracy-drop budget (points), the
    budget queries are answered per engine and device in ``summary.md`` and on stdout.

    Returns ``{"table", "summary", "fidelity", "csv", "plots", "skipped", "budgets"}``. Raises
    :class:`QatError` (``records``) if the root is missing or holds no valid record, before writing anything,
    and (``out``) if the outputs cannot be written.
    """
    out = Path(out_dir)
    joined, skipped = load_store(records_root)
    table = results_table(joined)
    summary = configurations(table)
    budgets = _budgets(summary, latency_budget_ms, accuracy_drop)
    fidelity = engine_fidelity_table(table)
    csv_path = out / "results.csv"
    frames = {csv_path: table, out / "summary.csv": summary}
    if not fidelity.empty:
        frames[out / "fidelity.csv"] = fidelity
    try:
        for path, frame in frames.items():
            atomic_write_bytes(path, frame.to_csv(index=False).encode())
        plots = _figures(table, summary, out)
        markdown = summary_markdown(summary, skipped, budgets, plots, fidelity=fidelity, host=host_target_line(table))
        atomic_write_bytes(out / "summary.md", markdown.encode())
    except OSError as exc:
        raise QatError("out", f"cannot write to {out}: {exc.strerror or exc}") from exc
    _print_summary(table, skipped, [*frames, out / "summary.md", *plots], budgets)
    return {"table": table, "summary": summary, "fidelity": fidelity, "csv": csv_path, "plots": plots,
            "skipped": skipped, "budgets": budgets}


def write_paper_table(
    name: str,
    records_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    where: dict[str, Any] | None = None,
    dataset_filter: bool = True,
) -> dict[str, Any]:
    """The paper table ``name`` beside our runs: ``<out>/<name>.{md,tex,csv}``; the Markdown is printed.
    Unknown ``name`` -> :class:`QatError` (``table``) listing the names, before reading anything."""
    get_table(name)
    joined, skipped = load_store(records_root)
    table = build_table(joined, name, where=where, dataset_filter=dataset_filter)
    try:
        paths = write_table(table, name, out_dir)
    except OSError as exc:
        raise QatError("out", f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    print(to_markdown(table, name))
    if skipped:
        print(f"skipped {len(skipped)} record(s): " + "; ".join(f"{p}: {r}" for p, r in skipped))
    for path in paths:
        print(f"wrote {path}")
    return {"table": table, "paths": paths, "skipped": skipped}
