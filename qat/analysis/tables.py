"""Paper tables with our numbers beside them: build, then render as Markdown, LaTeX and CSV.

For each row of a paper's table and each compared column (:mod:`qat.analysis.paper_tables`), the runs
matching the row's conditions give ``ours`` (mean over runs), ``std`` (sample, n > 1), ``n`` and
``delta = ours − paper``. A cell with no matching run stays missing: empty in the CSV, "—" in Markdown and
LaTeX, never filled in.
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
from qat.analysis.stats import t_interval
from qat.errors import choice_error
from qat.records import atomic_write_bytes

MISSING = "—"


def get_table(name: str) -> PaperTable:
    """The table called ``name``; :class:`QatError` (``report.table``) listing the names otherwise."""
    if name not in TABLES:
        raise choice_error("report.table", name, list(TABLES))
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


def _cell(runs: pd.DataFrame, paper_value: float, compared: Compared) -> dict[str, float | int]:
    values = pd.to_numeric(runs[compared.ours], errors="coerce") if compared.ours in runs.columns else pd.Series()
    mean, std, _, n = t_interval(values.to_numpy(dtype=float))
    paper = paper_value * compared.paper_scale if np.isfinite(paper_value) else math.nan
    delta = mean - paper if compared.delta and n else math.nan
    return {"paper": paper, "ours": mean, "std": std, "n": n, "delta": delta}


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
        data["delta_vs_float"] = pd.to_numeric(data["metric"], errors="coerce") - float_baseline(data)
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
            for part in ("paper", "ours", "std", "n", "delta"):
                if part != "delta" or compared.delta:
                    row[f"{compared.label} {'Δ' if part == 'delta' else part}"] = cell[part]
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


def display_table(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Strings for Markdown/LaTeX: ``ours`` as ``mean ± std`` (std when n > 1), missing cells "—",
    Δ signed; the ``std`` columns are folded into ``ours``."""
    spec = get_table(name)
    shown = table[[*spec.keys, *spec.shown]].apply(lambda col: col.map(lambda v: _number(v, 3)))
    shown = shown.astype(str).replace({"nan": MISSING})
    for compared in spec.compared:
        label = compared.label
        digits = 2 if compared.ours.startswith(("accuracy.", "metric", "delta")) else 1
        shown[f"{label} paper"] = table[f"{label} paper"].map(_number)
        ours = []
        for mean, std, n in zip(table[f"{label} ours"], table[f"{label} std"], table[f"{label} n"], strict=True):
            text = _number(mean, digits)
            if n > 1 and np.isfinite(std):
                text += f" ± {std:.{digits}f}"
            ours.append(text)
        shown[f"{label} ours"] = ours
        if compared.delta:
            shown[f"{label} Δ"] = [MISSING if not np.isfinite(v) else f"{v:+.{digits}f}" for v in table[f"{label} Δ"]]
        shown[f"{label} n"] = table[f"{label} n"].map(lambda v: str(int(v)))
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
    return "\n".join(lines)


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "Δ": r"$\Delta$", "—": "---", "−": "--"}


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


__all__ = ["build_table", "display_table", "get_table", "select", "to_latex", "to_markdown", "write_table"]
