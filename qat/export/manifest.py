"""The export manifest (schema ``qat.export/1``): what a device needs to run and check an exported model.

It names the model, the engine and its file (with sha256), the input (shape, dtype, the seed of the fixed input
and a raw copy of it, ``input.f32``, for devices without PyTorch) and the expected output on that input with the
tolerance to compare it by (one output LSB for integer models: engines requantize differently, Jacob eq. 6).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from qat.errors import QatError

MANIFEST_SCHEMA = "qat.export/1"
MANIFEST_NAME = "manifest.json"
INPUT_NAME = "input.f32"
REQUIRED = ("schema", "model_id", "engine", "file", "sha256", "input_shape", "input_dtype", "input_seed",
            "input_file", "expected_output", "output_shape", "tolerance", "precision", "bits")


def fixed_input(shape: list[int], seed: int) -> torch.Tensor:
    """The fixed input: ``torch.randn(shape)`` from a CPU generator seeded with ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qat_version() -> str:
    try:
        return version("qat")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def build_manifest(*, model_id: str, engine: dict[str, str], file: str, sha256: str, input_shape: list[int],
                   seed: int, output: torch.Tensor, atol: float, rtol: float, precision: str,
                   bits: dict[str, Any]) -> dict[str, Any]:
    return {"schema": MANIFEST_SCHEMA, "model_id": model_id, "engine": engine["engine"],
            "engine_version": engine["engine_version"], "file": file, "sha256": sha256,
            "input_shape": [int(s) for s in input_shape], "input_dtype": "float32", "input_seed": seed,
            "input_generator": "torch.randn(*input_shape, generator=torch.Generator().manual_seed(input_seed))",
            "input_file": INPUT_NAME, "output_shape": list(output.shape),
            "expected_output": [float(v) for v in output.reshape(-1).tolist()],
            "tolerance": {"atol": atol, "rtol": rtol}, "precision": precision, "bits": bits,
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "qat_version": qat_version()}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1) + "\n").encode()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an export directory, checked for its schema and fields."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise QatError(str(path), "does not exist", "give a directory written by qat.export.export_model") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QatError(str(path), f"is not valid JSON ({exc})", "export the model again") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise QatError(str(path), f"has schema {found!r}, this qat reads {MANIFEST_SCHEMA!r}",
                       "export the model again with this qat")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise QatError(str(path), f"lacks {', '.join(missing)}", "export the model again")
    return manifest
