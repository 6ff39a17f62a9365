"""Read every ``record.json`` under a directory into one flat pandas DataFrame.

Bad records (unreadable, invalid JSON, wrong schema, missing required fields) are skipped and reported,
never fatal: one broken run must not hide the others.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from qat.records import RECORD_NAME, RECORD_SCHEMA

REQUIRED = ("model_id", "quant.precision", "accuracy.top1")
"""Dotted fields every record must have (besides ``schema``)."""

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
    if missing:
        return "missing required field(s): " + ", ".join(missing)
    for key in ("model_id", "quant.precision"):
        if not isinstance(_get(record, key), str) or not _get(record, key):
            return f"{key} must be a non-empty string"
    top1 = _get(record, "accuracy.top1")
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1):
        return f"accuracy.top1 must be a finite number, got {top1!r}"
    if not 0.0 <= top1 <= 100.0:
        return f"accuracy.top1 = {top1!r} is outside 0..100 (accuracies are percentages)"
    return None


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
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            skipped.append((path, f"unreadable: {exc}"))
            continue
        except json.JSONDecodeError as exc:
            skipped.append((path, f"invalid JSON: {exc}"))
            continue
        reason = validate_record(record)
        if reason is not None:
            skipped.append((path, reason))
            continue
        rows.append({**record, "record_path": str(path)})
    if not rows:
        return pd.DataFrame(columns=[*REQUIRED, "record_path"]), skipped
    frame = pd.json_normalize(rows, sep=".")
    keys = [key for key in SORT_KEYS if key in frame.columns]
    frame = frame.sort_values(keys, key=_sort_key, kind="mergesort", na_position="last")
    return frame.reset_index(drop=True), skipped
