"""Latency records (schema ``qat.latency/1``): built from statistics, checked, written atomically.

A latency record joins accuracy records on ``model_id`` (:func:`qat.analysis.latency.join_latency`); it is
exactly what :func:`qat.analysis.latency.load_latency_records` reads: ``model_id``, ``engine``,
``engine_version``, ``device``, ``threads``, ``batch``, ``median_ms``, ``p10_ms``, ``p90_ms``, ``mean_ms``,
``std_ms``, ``n`` and ``host``, plus free provenance fields (``source``, ``resolution``, ...). Files are named
``latency*.json`` so the analysis finds them anywhere under a results store.
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qat.analysis.latency import LATENCY_SCHEMA, validate_latency
from qat.errors import QatError
from qat.records import atomic_write_bytes

STAT_FIELDS = ("median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms", "n")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def latency_record(*, model_id: str, engine: str, device: str, threads: int | None, batch: int | None,
                   stats: dict[str, Any], engine_version: str | None = None, host: dict[str, Any] | None = None,
                   **extra: Any) -> dict[str, Any]:
    """One ``qat.latency/1`` record; ``stats`` holds at least ``median_ms`` (other statistics where known)."""
    record: dict[str, Any] = {"schema": LATENCY_SCHEMA, "model_id": model_id, "engine": engine}
    if engine_version:
        record["engine_version"] = engine_version
    record.update({"device": device, "threads": threads, "batch": batch})
    for key in STAT_FIELDS:
        value = stats.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            record[key] = value
    record["host"] = host or {}
    record["created_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record.update(extra)
    return record


def latency_filename(record: dict[str, Any]) -> str:
    """``latency-<device>-<engine>-<model_id>-t<threads>-b<batch>.json`` (unsafe characters replaced by ``_``)."""
    parts = [str(record.get(k)) for k in ("device", "engine", "model_id")]
    parts += [f"t{record.get('threads')}", f"b{record.get('batch')}"]
    if record.get("resolution"):
        parts.append(f"r{record['resolution']}")
    return "latency-" + "-".join(_UNSAFE.sub("_", p) for p in parts) + ".json"


def write_latency_record(record: dict[str, Any], destination: str | os.PathLike[str]) -> Path:
    """Write ``record`` atomically; ``destination`` is a directory (file named by :func:`latency_filename`) or a
    ``latency*.json`` path. A record the analysis would skip is refused: nothing is written."""
    reason = validate_latency(record)
    if reason is not None:
        raise QatError("latency.record", f"not a usable {LATENCY_SCHEMA} record: {reason}",
                       "this is a bug in the producer of the record")
    path = Path(destination)
    if path.suffix != ".json":
        path = path / latency_filename(record)
    elif not path.name.startswith("latency"):
        raise QatError("latency.out", f"{path} is not named latency*.json, so the analysis would not find it",
                       "name the file latency<anything>.json or give a directory")
    atomic_write_bytes(path, (json.dumps(record, indent=2, default=str) + "\n").encode())
    return path
