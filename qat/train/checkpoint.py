"""Checkpoints written atomically (temporary file, fsync, rename); a resumed run reads the last one."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from qat.errors import QatError
from qat.records import atomic_write_bytes


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files all get the same message
        raise QatError("checkpoint", f"{path} cannot be read ({type(exc).__name__})",
                       "delete it to start that phase again") from exc
