"""Result records: one JSON file per run, written atomically; the contract between stages.

A record is written only when a run ends well (temporary file in the same directory, fsync, rename), so a
reader never sees half a record. Analysis reads nothing but records.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

RECORD_SCHEMA = "qat.record/1"
RECORD_NAME = "record.json"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_record(run_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write ``record`` as ``<run_dir>/record.json`` atomically and return its path."""
    record = {"schema": RECORD_SCHEMA, **record}
    path = Path(run_dir) / RECORD_NAME
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode())
    return path
