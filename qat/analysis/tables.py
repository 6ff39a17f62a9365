"""Paper tables with our numbers beside them: build, then render as Markdown, LaTeX and CSV.

For each row of a paper's table and each compared column (:mod:`qat.analysis.paper_tables`), the runs
matching the row's conditions give ``ours`` (mean over runs), ``std`` (sample, n > 1), ``n`` and
``delta = ours − paper``. A cell with no matching run stays missing: empty in the CSV, "—" in Markdown and
LaTeX, never filled in.

Simulated-only runs (no integer model: ``simulated_only``) never count in ``ours``: where they match a row, the
simulated model's value is in ``<label> simulated-only`` (and ``... simulated-only n``) of the CSV, and in
Markdown and LaTeX it is shown marked with † (``71.20†``), with a note under the table.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qat.analysis.budget import float_baseline
from qat.analysis.paper_tables import REFERENCE_DIR, TABLES, Compared, PaperTable
from qat.analysis.records import simulated_column, simulated_mask
from qat.analysis.stats import t_interval
from qat.errors import choice_error
from qat.records import atomic_write_bytes

MISSING = "—"
SIMULATED_MARK = "†"
SIMULATED_NOTE = (f"{SIMULATED_MARK} simulated only: the model has no integer form yet (e.g. MobileNet v3's hardswish, "
                  "PTQ two-tensor layers), so the value is the simulated model's, not an integer model's; n counts "
                  f"integer runs + simulated-only runs{SIMULATED_MARK}.")


def get_table(name: str) -> PaperTable:
    """The table called ``name``; :class:`QatError` (the report app's ``table`` key) listing the names otherwise."""
    if name not in TABLES:
        raise choice_error("table", name, list(TABLES))
    return TABLES[name]


def _equal(value: Any, wanted: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return False
    if isinstance(wanted, bool) or isinstance(value, bool):
        return isinstance(value, (bool, np.bool_)) and bool(value) == wanted
    if isinstance(wanted, (int, float)):
        try:
            return math.isclose(float(value), float(wanted), rel_tol=0, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    return str(value) == str(wanted)


def select(df: pd.DataFrame, conditions: Mapping[str, Any]) -> pd.DataFrame:
    """Rows of ``df`` meeting every condition: a value (equal; numbers compared as numbers), a tuple (any
    of) or a callable (predicate). A condition on a column ``df`` lacks matches nothing."""
    mask = pd.Series(True, index=df.index)
    for column, wanted in conditions.items():
        if column not in df.columns:
            return df.iloc[:0]
        if callable(wanted):
            test = wanted
        elif isinstance(wanted, tuple):
            options = wanted
            test = lambda v, options=options: any(_equal(v, w) for w in options)  # noqa: E731
        else:
            test = lambda v, wanted=wanted: _equal(v, wanted)  # noqa: E731
        mask &= df[column].map(test).astype(bool)
    return df[mask]


def _values(runs: pd.DataFrame, column: str | None) -> np.ndarray:
    if column is None or column not in runs.columns:
        return np.array([], dtype=float)
    return pd.to_numeric(runs[column], errors="coerce").to_numpy(dtype=float)


def _cell(runs: pd.DataFrame, paper_value: float, compared: Compared) -> dict[str, float | int]:
    simulated = simulated_mask(runs)
    mean, std, _, n = t_interval(_values(runs[~simulated], compared.ours))
    sim_mean, sim_std, _, sim_n = t_interval(_values(runs[simulated], simulated_column(compared.ours)))
    paper = paper_value * compared.paper_scale if np.isfinite(paper_value) else math.nan
    delta = mean - paper if compared.delta and n else math.nan
    sim_delta = sim_mean - paper if compared.delta and sim_n else math.nan
    return {"paper": paper, "ours": mean, "std": std, "n": n, "delta": delta, "sim": sim_mean, "sim_std": sim_std,
            "sim_n": sim_n, "sim_delta": sim_delta}


def _simulated_parts(compared: Compared) -> tuple[str, ...]:
    """The simulated-only cell parts a compared quantity has (none for latency: such runs have none)."""
    return ("sim", "sim_std", "sim_n", "sim_delta") if simulated_column(compared.ours) is not None else ()


PART_NAMES = {"delta": "Δ", "sim": "simulated-only", "sim_std": "simulated-only std",
              "sim_n": "simulated-only n", "sim_delta": "simulated-only Δ"}


def build_table(
    records: pd.DataFrame,
    name: str,
    *,
    where: Mapping[str, Any] | None = None,
    dataset_filter: bool = True,
    reference_dir: str | os.PathLike[str] = REFERENCE_DIR,
) -> pd.DataFrame:
    """The paper's table ``name`` with our runs beside it (one row per paper row).

    Columns: the paper's key columns and shown columns, then for each compared quantity ``<label> paper``,
    ``<label> ours``, ``<label> std``, ``<label> n`` and (where meaningful) ``<label> Δ``. ``records`` is a
    per-run table (:func:`qat.analysis.join_latency`); ``where`` adds conditions on record columns (e.g.
    ``{"model.arch": "mobilenet_v2"}``); ``dataset_filter=False`` drops the table's dataset conditions.
    """
    spec = get_table(name)
    reference = spec.reference(Path(reference_dir))
    data = records.copy()
    if any(c.ours == "delta_vs_float" for c in spec.compared) and "metric" in data.columns:
        baseline = float_baseline(data)
        data["delta_vs_float"] = pd.to_numeric(data["metric"], errors="coerce") - baseline
        if "metric_sim" in data.columns:
            data["delta_vs_float_sim"] = pd.to_numeric(data["metric_sim"], errors="coerce") - baseline
    extra = {**(spec.dataset if dataset_filter else {}), **(where or {})}
    rows = []
    for entry in reference.to_dict("records"):  # native types per column: 8 stays 8, not 8.0
        paper_row = pd.Series(entry, dtype=object)
        row: dict[str, Any] = {key: paper_row[key] for key in (*spec.keys, *spec.shown)}
        for compared in spec.compared:
            conditions = (compared.match or spec.match)(paper_row)
            runs = select(data, {**conditions, **extra}) if conditions is not None else data.iloc[:0]
            paper_value = pd.to_numeric(pd.Series([paper_row[compared.paper]]), errors="coerce").iloc[0]
            cell = _cell(runs, float(paper_value), compared)
            for part in ("paper", "ours", "std", "n", "delta", *_simulated_parts(compared)):
                if "delta" not in part or compared.delta:
                    row[f"{compared.label} {PART_NAMES.get(part, part)}"] = cell[part]
        rows.append(row)
    return pd.DataFrame(rows)


def _number(value: Any, digits: int = 1) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def _mean_text(mean: Any, std: Any, n: Any, digits: int) -> str:
    text = _number(mean, digits)
    if n > 1 and np.isfinite(std):
        text += f" ± {std:.{digits}f}"
    return text


def _simulated(table: pd.DataFrame, label: str) -> pd.Series:
    """Per row: how many simulated-only runs matched (0 where the table has no such column)."""
    column = f"{label} simulated-only n"
    if column not in table.columns:
        return pd.Series(0, index=table.index)
    return pd.to_numeric(table[column], errors="coerce").fillna(0).astype(int)


def has_simulated(table: pd.DataFrame, name: str) -> bool:
    """True when some cell of the table holds simulated-only runs (shown marked with † and a note)."""
    return any(_simulated(table, c.label).gt(0).any() for c in get_table(name).compared)


def display_table(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Strings for Markdown/LaTeX: ``ours`` as ``mean ± std`` (std when n > 1), missing cells "—",
    Δ signed; the ``std`` columns are folded into ``ours``. Simulated-only runs are marked †: their value after
    the integer runs' (``75.00; 74.10†``) or alone (``74.10†``), Δ only when there is no integer run, n as
    ``integer+simulated†``."""
    spec = get_table(name)
    shown = table[[*spec.keys, *spec.shown]].apply(lambda col: col.map(lambda v: _number(v, 3)))
    shown = shown.astype(str).replace({"nan": MISSING})
    for compared in spec.compared:
        label = compared.label
        digits = 2 if compared.ours.startswith(("accuracy.", "metric", "delta")) else 1
        shown[f"{label} paper"] = table[f"{label} paper"].map(_number)
        sim_n = _simulated(table, label)
        ours, deltas, counts = [], [], []
        for i, (mean, std, n) in enumerate(zip(table[f"{label} ours"], table[f"{label} std"], table[f"{label} n"],
                                               strict=True)):
            text = _mean_text(mean, std, n, digits)
            delta = table[f"{label} Δ"].iloc[i] if compared.delta else math.nan
            delta_text = MISSING if not np.isfinite(delta) else f"{delta:+.{digits}f}"
            count = str(int(n))
            if (k := int(sim_n.iloc[i])) > 0:
                sim_text = _mean_text(table[f"{label} simulated-only"].iloc[i],
                                      table[f"{label} simulated-only std"].iloc[i], k, digits) + SIMULATED_MARK
                text = sim_text if n == 0 else f"{text}; {sim_text}"
                sim_delta = table[f"{label} simulated-only Δ"].iloc[i] if compared.delta else math.nan
                if n == 0 and np.isfinite(sim_delta):
                    delta_text = f"{sim_delta:+.{digits}f}{SIMULATED_MARK}"
                count = f"{int(n)}+{k}{SIMULATED_MARK}"
            ours.append(text)
            deltas.append(delta_text)
            counts.append(count)
        shown[f"{label} ours"] = ours
        if compared.delta:
            shown[f"{label} Δ"] = deltas
        shown[f"{label} n"] = counts
    return shown


def to_markdown(table: pd.DataFrame, name: str) -> str:
    """GitHub Markdown: title, the table, how rows were matched."""
    spec = get_table(name)
    shown = display_table(table, name)
    lines = [f"**{spec.title}**", "", "| " + " | ".join(shown.columns) + " |",
             "|" + "|".join("---" for _ in shown.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in shown.itertuples(index=False)]
    lines += ["", f"Matching: {spec.matching} ours = mean over matching runs (± sample std when n > 1); "
                  f"{MISSING} = no run. Source: results/reference/{spec.csv}.", ""]
    if has_simulated(table, name):
        lines += [SIMULATED_NOTE, ""]
    return "\n".join(lines)


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "Δ": r"$\Delta$", "—": "---", "−": "--", SIMULATED_MARK: r"$^\dagger$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, name: str) -> str:
    """A booktabs ``table`` environment with caption and label ``tab:<name>``."""
    spec = get_table(name)
    shown = display_table(table, name)
    align = "l" * len(spec.keys) + "r" * (len(shown.columns) - len(spec.keys))
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in shown.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in shown.itertuples(index=False)]
    caption = f"{latex_escape(spec.title)}. {latex_escape(spec.matching)}"
    if has_simulated(table, name):
        caption += f" {latex_escape(SIMULATED_NOTE)}"
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{caption}}}", rf"\label{{tab:{name}}}", r"\end{table}", ""]
    return "\n".join(lines)


def write_table(table: pd.DataFrame, name: str, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``<out>/<name>.md``, ``.tex`` and ``.csv`` (numbers; missing cells empty) atomically."""
    out = Path(out_dir)
    contents = {
        ".md": to_markdown(table, name),
        ".tex": to_latex(table, name),
        ".csv": table.to_csv(index=False),
    }
    paths = []
    for suffix, text in contents.items():
        path = out / f"{name}{suffix}"
        atomic_write_bytes(path, text.encode())
        paths.append(path)
    return paths


__all__ = ["build_table", "display_table", "get_table", "has_simulated", "select", "to_latex", "to_markdown",
           "write_table"]
