"""Read every ``record.json`` under a directory into one flat pandas DataFrame.

Bad records (unreadable, invalid JSON, wrong schema, missing required fields) are skipped and reported,
never fatal: one broken run must not hide the others.

Every row also gets four derived columns, so classification and detection runs and records written before
the ``method`` field existed can be analysed with the same code:

- ``task``: ``"classification"`` when the record has ``accuracy.top1``, ``"detection"`` when it has
  ``accuracy.map`` (COCO mAP);
- ``metric_name`` / ``metric``: ``"top1"`` / ``accuracy.top1`` for classification, ``"map"`` /
  ``accuracy.map`` for detection (both in percent);
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
"""Accuracy metric (``accuracy.<name>``, percent) -> task; a record needs at least one of them."""

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
    present = [name for name in METRICS if _get(record, f"accuracy.{name}") is not None]
    if not present:
        missing.append(" or ".join(f"accuracy.{name}" for name in METRICS))
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


def add_derived_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``task``, ``metric_name``, ``metric``, ``metric_float`` and ``method`` (see the module doc)."""
    frame = frame.copy()
    top1 = pd.to_numeric(_column(frame, "accuracy.top1"), errors="coerce")
    is_cls = top1.notna()
    frame["task"] = is_cls.map({True: "classification", False: "detection"})
    frame["metric_name"] = is_cls.map({True: "top1", False: "map"})
    frame["metric"] = top1.where(is_cls, pd.to_numeric(_column(frame, "accuracy.map"), errors="coerce"))
    float_top1 = pd.to_numeric(_column(frame, "accuracy.float_top1"), errors="coerce")
    float_map = pd.to_numeric(_column(frame, "accuracy.float_map"), errors="coerce")
    frame["metric_float"] = float_top1.where(is_cls, float_map)
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
        columns = [*REQUIRED, "accuracy.top1", "record_path", "task", "metric_name", "metric", "metric_float",
                   "method"]
        return pd.DataFrame(columns=columns), skipped
    frame = add_derived_columns(pd.json_normalize(rows, sep="."))
    keys = [key for key in SORT_KEYS if key in frame.columns]
    frame = frame.sort_values(keys, key=_sort_key, kind="mergesort", na_position="last")
    return frame.reset_index(drop=True), skipped
