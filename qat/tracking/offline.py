"""Read the records of an offline W&B run file (``wandb/offline-run-*/run-<id>.wandb``) without syncing it.

The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by the LevelDB log format: 32 KiB
blocks of chunks ``crc32c (4) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last) | data``, each
assembled record a ``wandb_internal_pb2.Record`` protobuf. Checksums are not verified here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qat.errors import QatError

BLOCK = 32768
HEADER = 7
CHUNK = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(raw: bytes) -> Iterator[bytes]:
    pos, pending = HEADER, b""
    while pos + CHUNK <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < CHUNK:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + CHUNK])
        if kind == 0 and length == 0:  # zero-filled rest of a block
            pos += left
            continue
        data = raw[pos + CHUNK:pos + CHUNK + length]
        pos += CHUNK + length
        if kind == FULL:
            yield data
        elif kind == FIRST:
            pending = data
        elif kind == MIDDLE:
            pending += data
        elif kind == LAST:
            yield pending + data
            pending = b""


def read_records(path: str | Path) -> Iterator[Any]:
    """Every ``Record`` protobuf in ``path``, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    if raw[:4] != b":W&B":
        raise QatError(str(path), "is not a W&B run file", "give wandb/offline-run-*/run-<id>.wandb")
    for payload in _payloads(raw):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _items_to_dict(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key = item.key or "/".join(item.nested_key)
        out[key] = json.loads(item.value_json)
    return out


def summarize(path: str | Path) -> dict[str, Any]:
    """The run's id, group, config, history rows (list of dicts), final summary and exit code."""
    run: dict[str, Any] = {"history": [], "summary": {}, "exit_code": None, "preempting": False}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(id=record.run.run_id, group=record.run.run_group, project=record.run.project,
                       config=_items_to_dict(record.run.config.update))
        elif kind == "history":
            run["history"].append(_items_to_dict(record.history.item))
        elif kind == "summary":
            run["summary"].update(_items_to_dict(record.summary.update))
        elif kind == "preempting":
            run["preempting"] = True
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run
