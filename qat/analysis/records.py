"""Read every ``record.json`` under a directory into one flat pandas DataFrame.

Bad records (unreadable, invalid JSON, wrong schema, missing required fields) are skipped and reported,
never fatal: one broken run must not hide the others.

Every row also gets derived columns, so classification and detection runs, simulated-only runs and records
written before the ``method`` field existed can be analysed with the same code:

- ``simulated_only``: True for a run whose model has no integer form (``status == "simulated_only"``; also an
  older record whose ``fidelity.integer_model`` says ``not convertible: ...``). Such a run has the simulated
  model's accuracy only (``accuracy.sim_top1`` / ``sim_map``) and no integer latency; in the frame its
  ``accuracy.top1`` / ``top5`` / ``map`` are NaN (older records wrote the simulated values there), so no
  integer column ever holds a simulated number;
- ``task``: ``"classification"`` when the record has ``accuracy.top1`` (or, simulated only, ``sim_top1``),
  ``"detection"`` when it has ``accuracy.map`` (``sim_map``) (COCO mAP);
- ``metric_name`` / ``metric``: ``"top1"`` / ``accuracy.top1`` for classification, ``"map"`` /
  ``accuracy.map`` for detection (both in percent): the float model's value for float runs, the integer
  model's for quantized runs, NaN for simulated-only runs;
- ``metric_sim``: the simulated model's value (``accuracy.sim_top1`` / ``accuracy.sim_map``) where recorded;
  for a simulated-only run it is the only accuracy there is;
- ``metric_float``: the run's own float-model value (``accuracy.float_top1`` / ``accuracy.float_map``);
- ``method``: the record's ``method`` (or ``quant.method``); a record without one was written by the
  QAT-only pipeline, so it is ``"float"`` for ``quant.precision == "float"`` and ``"qat"`` otherwise.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from qat.records import RECORD_NAME, RECORD_SCHEMA

REQUIRED = ("model_id", "quant.precision")
"""Dotted fields every record must have (besides ``schema`` and one metric of :data:`METRICS`)."""

METRICS = {"top1": "classification", "map": "detection"}
"""Accuracy metric (``accuracy.<name>``, percent) -> task; a record needs at least one of them (a simulated-only
record: ``accuracy.sim_<name>``)."""

SIMULATED_ONLY = "simulated_only"
"""The ``status`` of a run whose model has no integer form: simulated accuracy only, no integer latency."""

INTEGER_ACCURACY = ("accuracy.top1", "accuracy.top5", "accuracy.map")
"""Columns that hold the integer (or float) model's accuracy: NaN for simulated-only rows."""

SORT_KEYS = (
    "quant.precision", "model.arch", "model.width_mult", "model.resolution", "model_id", "record_path",
)  # fmt: skip
"""Row order: grouped by precision, then architecture, width, resolution; ``record_path`` breaks ties."""

_NUMERIC_SORT = {"model.width_mult", "model.resolution"}


def _get(record: dict[str, Any], dotted: str) -> Any:
    """``record["a"]["b"]`` for ``"a.b"``; ``None`` where any level is absent or not a dict."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def validate_record(record: Any) -> str | None:
    """Return why ``record`` is not a usable ``qat.record/1`` record, or ``None`` if it is."""
    if not isinstance(record, dict):
        return f"not a JSON object (got {type(record).__name__})"
    schema = record.get("schema")
    if schema != RECORD_SCHEMA:
        return f"schema is {schema!r}, expected {RECORD_SCHEMA!r}"
    missing = [key for key in REQUIRED if _get(record, key) is None]
    prefix = "sim_" if record.get("status") == SIMULATED_ONLY else ""
    present = [f"{prefix}{name}" for name in METRICS if _get(record, f"accuracy.{prefix}{name}") is not None]
    if not present:
        missing.append(" or ".join(f"accuracy.{prefix}{name}" for name in METRICS))
    if missing:
        return "missing required field(s): " + ", ".join(missing)
    for key in ("model_id", "quant.precision"):
        if not isinstance(_get(record, key), str) or not _get(record, key):
            return f"{key} must be a non-empty string"
    for name in present:
        value = _get(record, f"accuracy.{name}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"accuracy.{name} must be a finite number, got {value!r}"
        if not 0.0 <= value <= 100.0:
            return f"accuracy.{name} = {value!r} is outside 0..100 (accuracies are percentages)"
    return None


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame.columns else pd.Series(pd.NA, index=frame.index, dtype=object)


def simulated_only(frame: pd.DataFrame) -> pd.Series:
    """True per row of a run with no integer model: ``status == "simulated_only"``, or (records written before
    that status existed) ``fidelity.integer_model`` starting with ``"not convertible"``."""
    status = _column(frame, "status").eq(SIMULATED_ONLY).fillna(False).astype(bool)
    legacy = _column(frame, "fidelity.integer_model").map(
        lambda v: isinstance(v, str) and v.startswith("not convertible")).astype(bool)
    return (status | legacy).rename(SIMULATED_ONLY)


def simulated_mask(frame: pd.DataFrame) -> pd.Series:
    """The ``simulated_only`` column of any table of rows or configurations as booleans (False where absent)."""
    if SIMULATED_ONLY not in frame.columns:
        return pd.Series(False, index=frame.index, name=SIMULATED_ONLY)
    return frame[SIMULATED_ONLY].eq(True).astype(bool)


SIMULATED_COLUMNS = {"metric": "metric_sim", "accuracy.top1": "accuracy.sim_top1", "accuracy.top5": "accuracy.sim_top5",
                     "accuracy.map": "accuracy.sim_map", "delta_vs_float": "delta_vs_float_sim"}
"""An accuracy column -> the column with the simulated model's value of the same quantity."""


def simulated_column(column: str) -> str | None:
    """The simulated-model counterpart of ``column`` (``metric`` -> ``metric_sim``, ``metric.mean`` ->
    ``metric_sim.mean``, ``accuracy.top1`` -> ``accuracy.sim_top1``); ``None`` for a column without one."""
    suffix = ".mean" if column.endswith(".mean") else ""
    base = SIMULATED_COLUMNS.get(column.removesuffix(suffix))
    return None if base is None else base + suffix


def add_derived_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``simulated_only``, ``task``, ``metric_name``, ``metric``, ``metric_sim``, ``metric_float``,
    ``metric_vs_float`` (the run's metric, or its simulated one without an integer model, minus its own float
    model's: a paired difference, the fair one where each seed trains its own float model) and ``method``, and
    blank the integer accuracy of simulated-only rows (see the module doc)."""
    frame = frame.copy()
    sim_only = simulated_only(frame)
    frame[SIMULATED_ONLY] = sim_only
    for column in INTEGER_ACCURACY:  # older simulated-only records wrote the simulated values here
        if column in frame.columns:
            sim_column = column.replace("accuracy.", "accuracy.sim_")
            if sim_column not in frame.columns:
                frame[sim_column] = pd.NA
            frame[sim_column] = frame[sim_column].where(~sim_only | frame[sim_column].notna(), frame[column])
            frame[column] = pd.to_numeric(frame[column], errors="coerce").where(~sim_only)
    top1 = pd.to_numeric(_column(frame, "accuracy.top1"), errors="coerce")
    sim_top1 = pd.to_numeric(_column(frame, "accuracy.sim_top1"), errors="coerce")
    is_cls = top1.notna() | (sim_only & sim_top1.notna())
    frame["task"] = is_cls.map({True: "classification", False: "detection"})
    frame["metric_name"] = is_cls.map({True: "top1", False: "map"})
    frame["metric"] = top1.where(is_cls, pd.to_numeric(_column(frame, "accuracy.map"), errors="coerce"))
    frame["metric_sim"] = sim_top1.where(is_cls, pd.to_numeric(_column(frame, "accuracy.sim_map"), errors="coerce"))
    float_top1 = pd.to_numeric(_column(frame, "accuracy.float_top1"), errors="coerce")
    float_map = pd.to_numeric(_column(frame, "accuracy.float_map"), errors="coerce")
    frame["metric_float"] = float_top1.where(is_cls, float_map)
    frame["metric_vs_float"] = frame["metric"].where(~sim_only, frame["metric_sim"]) - frame["metric_float"]
    for key in ("quant.weight_bits", "quant.act_bits"):  # per-layer widths ({"mixed": {bits: layers}}): "4/8"
        mixed = sorted((c for c in frame.columns if c.startswith(f"{key}.mixed.")),
                       key=lambda c: int(c.rsplit(".", 1)[1]))
        if mixed:
            present = frame[mixed].notna()
            widths = present.apply(lambda row, m=mixed: "/".join(c.rsplit(".", 1)[1] for c in m if row[c]), axis=1)
            current = _column(frame, key)
            frame[key] = current.astype(object).where(current.notna(), widths.where(widths != "", pd.NA))
    legacy = frame["quant.precision"].map(lambda p: "float" if p == "float" else "qat")
    method = _column(frame, "method").combine_first(_column(frame, "quant.method"))
    frame["method"] = method.where(method.notna(), legacy).astype(str)
    return frame


def read_json(path: Path) -> tuple[Any, str | None]:
    """``(parsed JSON, None)``, or ``(None, reason)`` when the file cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable: {exc}"
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc}"


def _find(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(root.rglob(RECORD_NAME))


def _sort_key(column: pd.Series) -> pd.Series:
    if column.name in _NUMERIC_SORT:
        return pd.to_numeric(column, errors="coerce")
    return column.astype(str)


def load_records(root: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Load all records under ``root`` (a directory searched recursively, or one record file).

    Returns ``(frame, skipped)``: one row per valid record with nested fields flattened to dotted columns
    (``model.arch``, ``accuracy.top1``, ``latency.median_ms``, ...) plus ``record_path``, sorted
    deterministically; and ``(path, reason)`` for every record that was skipped.
    Raises ``FileNotFoundError`` if ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {root}")
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[Path, str]] = []
    for path in _find(root):
        record, reason = read_json(path)
        if reason is not None:
            skipped.append((path, reason))
            continue
        reason = validate_record(record)
        if reason is not None:
            skipped.append((path, reason))
            continue
        rows.append({**record, "record_path": str(path)})
    if not rows:
        columns = [*REQUIRED, "accuracy.top1", "record_path", SIMULATED_ONLY, "task", "metric_name", "metric",
                   "metric_sim", "metric_float", "method"]
        return pd.DataFrame(columns=columns), skipped
    frame = add_derived_columns(pd.json_normalize(rows, sep="."))
    keys = [key for key in SORT_KEYS if key in frame.columns]
    frame = frame.sort_values(keys, key=_sort_key, kind="mergesort", na_position="last")
    return frame.reset_index(drop=True), skipped
