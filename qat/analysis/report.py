"""Records in, tidy ``results.csv`` and the trade-off plot out."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pandas as pd

from qat.analysis.pareto import pareto_front
from qat.analysis.plots import plot_tradeoff
from qat.analysis.records import load_records
from qat.errors import QatError
from qat.records import atomic_write_bytes

CORE_COLUMNS = (
    "model_id", "model.arch", "model.width_mult", "model.resolution",
    "quant.precision", "quant.weight_bits", "quant.act_bits",
    "accuracy.top1", "accuracy.float_top1", "accuracy.sim_top1", "accuracy.int_top1",
    "latency.engine", "latency.threads", "latency.median_ms", "latency.p10_ms", "latency.p90_ms",
)  # fmt: skip
"""Always present in ``results.csv``, in this order (empty where no record has them), then ``pareto``,
then every other record field in alphabetical order."""

INTEGER_COLUMNS = (
    "seed", "model.resolution", "model.num_classes", "model.params", "model.macs", "data.val_size",
    "quant.weight_bits", "quant.act_bits", "latency.threads", "latency.batch", "latency.n", "latency.warmup",
)  # fmt: skip
"""Written as integers even where some records lack them (no ``32.0``)."""

SUMMARY_COLUMNS = ("model_id", "quant.precision", "accuracy.top1", "latency.median_ms", "pareto")


def results_table(df: pd.DataFrame) -> pd.DataFrame:
    """The tidy table: core columns first, a ``pareto`` flag, then the remaining fields."""
    table = df.copy()
    for column in CORE_COLUMNS:
        if column not in table.columns:
            table[column] = pd.NA
    table["pareto"] = pareto_front(table)
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


def _print_summary(
    table: pd.DataFrame, skipped: list[tuple[Path, str]], csv_path: Path, plots: list[Path]
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
    print(f"wrote {csv_path}")
    for path in plots:
        print(f"wrote {path}")


def write_report(records_root: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``records_root``; write ``results.csv`` and ``tradeoff.{png,pdf}`` in ``out_dir``.

    Returns ``{"table", "csv", "plots", "skipped"}``. The plot is left out (``plots == []``) when no record
    has a latency. Raises :class:`QatError` (``report.records``) if the root is missing or holds no valid
    record, and (``report.out``) if the outputs cannot be written.
    """
    root, out = Path(records_root), Path(out_dir)
    try:
        frame, skipped = load_records(root)
    except FileNotFoundError:
        fix = "pass records=<directory of runs>"
        raise QatError("report.records", f"{root} does not exist", fix) from None
    if frame.empty:
        why = f"{len(skipped)} record.json file(s), none valid" if skipped else "no record.json found"
        raise QatError("report.records", f"{why} under {root}", "point records= at finished runs") from None
    table = results_table(frame)
    csv_path = out / "results.csv"
    try:
        atomic_write_bytes(csv_path, table.to_csv(index=False).encode())
        has_latency = bool(pd.to_numeric(table["latency.median_ms"], errors="coerce").gt(0).any())
        plots = plot_tradeoff(table, out / "tradeoff") if has_latency else []
    except OSError as exc:
        raise QatError("report.out", f"cannot write to {out}: {exc.strerror or exc}") from exc
    _print_summary(table, skipped, csv_path, plots)
    return {"table": table, "csv": csv_path, "plots": plots, "skipped": skipped}
