"""Latency measurements, wherever they were taken, and their join with accuracy records.

A latency measurement comes either embedded in a run record (its ``latency`` block: the engine and
device the run itself measured) or as a separate latency record, schema ``qat.latency/1``, written by a
latency job or ingested from a phone::

    {"schema": "qat.latency/1", "model_id": "...", "engine": "executorch_xnnpack", "device": "pixel7",
     "threads": 1, "batch": 1, "median_ms": 3.1, "p10_ms": 3.0, "p90_ms": 3.4, "n": 200, "host": {...}}

Separate records live in files named ``latency*.json`` anywhere under the results store; a file holds one
record or a JSON list of them. :func:`join_latency` is accuracy ⋈ latency on ``model_id``: one row per
(accuracy record, measurement), the measurement's fields in ``latency.*`` columns and its origin in
``latency.source`` (``"record"`` or the latency file's path). Filter on ``latency.engine``,
``latency.device`` and ``latency.threads`` to compare like with like.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from qat.analysis.records import read_json

LATENCY_SCHEMA = "qat.latency/1"
LATENCY_GLOB = "latency*.json"
LATENCY_REQUIRED = ("model_id", "engine", "device", "median_ms")
LATENCY_FIELDS = ("engine", "engine_version", "device", "threads", "batch", "median_ms", "p10_ms", "p90_ms",
                  "mean_ms", "std_ms", "n")
JOIN_KEYS = ("latency.engine", "latency.device", "latency.threads", "latency.batch")
"""Besides ``model_id``: what makes two measurements comparable."""


def validate_latency(entry: Any) -> str | None:
    """Why ``entry`` is not a usable ``qat.latency/1`` record, or ``None`` if it is."""
    if not isinstance(entry, dict):
        return f"not a JSON object (got {type(entry).__name__})"
    if entry.get("schema") != LATENCY_SCHEMA:
        return f"schema is {entry.get('schema')!r}, expected {LATENCY_SCHEMA!r}"
    missing = [key for key in LATENCY_REQUIRED if entry.get(key) in (None, "")]
    if missing:
        return "missing required field(s): " + ", ".join(missing)
    median = entry["median_ms"]
    if isinstance(median, bool) or not isinstance(median, (int, float)) or not math.isfinite(median) or median <= 0:
        return f"median_ms must be a positive number, got {median!r}"
    return None


def load_latency_records(root: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[tuple[Path, str]]]:
    """Every separate latency record under ``root`` -> ``(frame, skipped)``.

    ``frame`` has ``model_id``, ``latency.<field>`` for each field present and ``latency.source`` (the file).
    Bad files or entries are listed in ``skipped`` with the reason (``file#index`` for list entries).
    Raises ``FileNotFoundError`` if ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {root}")
    paths = [root] if root.is_file() else sorted(root.rglob(LATENCY_GLOB))
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        content, reason = read_json(path)
        if reason is not None:
            skipped.append((path, reason))
            continue
        entries = content if isinstance(content, list) else [content]
        for i, entry in enumerate(entries):
            reason = validate_latency(entry)
            where = path if not isinstance(content, list) else Path(f"{path}#{i}")
            if reason is not None:
                skipped.append((where, reason))
                continue
            row = {f"latency.{key}": entry[key] for key in LATENCY_FIELDS if key in entry}
            rows.append({"model_id": entry["model_id"], **row, "latency.source": str(where)})
    columns = ["model_id", *(f"latency.{k}" for k in LATENCY_FIELDS), "latency.source"]
    frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
    return frame, skipped


def join_latency(records: pd.DataFrame, latency: pd.DataFrame | None = None) -> pd.DataFrame:
    """Accuracy ⋈ latency on ``model_id``: one row per (record, measurement), embedded and separate.

    ``records`` is :func:`qat.analysis.load_records`' frame; ``latency`` is
    :func:`load_latency_records`' frame (or ``None``: embedded measurements only). A record's embedded
    measurement stays on that record (``latency.source == "record"``); each separate measurement joins every
    record with its ``model_id``. A record with no measurement at all is kept once, with empty ``latency.*``
    (a left join: accuracy is never dropped). Separate measurements matching no record are left out.
    """
    records = records.reset_index(drop=True).assign(_row=lambda f: range(len(f)))
    has_own = (pd.to_numeric(records["latency.median_ms"], errors="coerce").notna()
               if "latency.median_ms" in records.columns else pd.Series(False, index=records.index))
    embedded = records[has_own].assign(**{"latency.source": "record"})
    accuracy = records.drop(columns=[c for c in records.columns if c.startswith("latency.")])
    parts = [embedded]
    matched = pd.Series(False, index=records.index)
    if latency is not None and not latency.empty:
        separate = accuracy.merge(latency, on="model_id", how="inner", sort=False)
        matched = records["_row"].isin(separate["_row"])
        parts.append(separate)
    parts.append(accuracy[~has_own & ~matched].assign(**{"latency.source": pd.NA}))
    joined = pd.concat([part for part in parts if not part.empty] or [embedded], ignore_index=True, sort=False)
    joined["_own"] = joined["latency.source"] != "record"
    joined = joined.sort_values(["_row", "_own", "latency.source"], kind="mergesort", na_position="first")
    columns = [c for c in records.columns if c != "_row"]
    columns += [c for c in joined.columns if c not in columns and c not in ("_row", "_own")]
    return joined.reindex(columns=columns).reset_index(drop=True)  # latency.* empty where no record has any


__all__ = ["JOIN_KEYS", "LATENCY_SCHEMA", "join_latency", "load_latency_records"]
