"""``export_model`` writes an engine file and its manifest into a directory; ``verify_export`` re-runs it.

The expected output is computed by loading the very bytes that are written, so a round trip must reproduce it.
Everything is computed before anything is written; files are written atomically and a failed export removes
what it wrote.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from qat.engines.registry import KEY, engine_info, entry
from qat.errors import QatError
from qat.export import onnx as onnx_format
from qat.export import pte as pte_format
from qat.export.manifest import INPUT_NAME, MANIFEST_NAME, build_manifest, fixed_input, manifest_bytes, read_manifest
from qat.fidelity import output_lsb
from qat.intmodel.graph import IntModel
from qat.records import atomic_write_bytes

FORMATS: dict[str, ModuleType] = {"onnxruntime": onnx_format, "executorch_xnnpack": pte_format}
FLOAT_RTOL = 1e-4


def _format(engine: str) -> ModuleType:
    entry(engine)  # unknown names list the valid ones
    if engine not in FORMATS:
        raise QatError(KEY, f"engine {engine!r} has no export format", f"export with one of: {', '.join(FORMATS)}")
    return FORMATS[engine]


def int_tolerance(int_model: IntModel) -> tuple[float, float]:
    """(atol, rtol) of an int8 export's expected output: one output LSB (:func:`qat.fidelity.output_lsb`); a
    model whose logits have no output quantizer has no LSB, so it gets the float tolerance instead of zero."""
    lsb = output_lsb(int_model)
    return (lsb * 1.001, 0.0) if lsb is not None else (FLOAT_RTOL, FLOAT_RTOL)


def export_model(engine: str, model: IntModel | nn.Module, out_dir: str | os.PathLike[str], model_id: str, *,
                 example: torch.Tensor | None = None, seed: int = 0) -> Path:
    """Write ``<out_dir>/<model_id><suffix>``, ``input.f32`` and ``manifest.json``; return ``out_dir``.

    ``model`` is an integer model (int8 engine file) or a float module (float engine file; ``example`` gives the
    input shape).
    """
    fmt = _format(engine)
    if isinstance(model, IntModel):
        shape = list(model.input_shape)
        data = fmt.int_bytes(model)
        precision = "int8"
        bits: dict[str, Any] = {"min_bits": model.min_bits, "container_bits": 8, "emulated_bits": model.min_bits < 8}
        atol, rtol = int_tolerance(model)
    elif isinstance(model, nn.Module):
        if example is None:
            raise QatError("export.example", "a float module needs an example input", "pass example=tensor")
        shape = list(example.shape)
        data = fmt.float_bytes(model, example)
        precision, bits = "float32", {"min_bits": 32, "container_bits": 32, "emulated_bits": False}
        atol, rtol = FLOAT_RTOL, FLOAT_RTOL
    else:
        raise QatError("export.model", f"{type(model).__name__} is neither an IntModel nor an nn.Module",
                       "pass qat.intmodel.convert(...) or a float torch module")
    x = fixed_input(shape, seed)
    output = fmt.load(data, 1)(x).detach().float()
    file = f"{model_id}{fmt.SUFFIX}"
    manifest = build_manifest(model_id=model_id, engine=engine_info(engine), file=file,
                              sha256=hashlib.sha256(data).hexdigest(), input_shape=shape, seed=seed, output=output,
                              atol=atol, rtol=rtol, precision=precision, bits=bits)
    out = Path(out_dir)
    written: list[Path] = []
    try:
        for name, payload in ((file, data), (INPUT_NAME, x.numpy().astype("<f4").tobytes()),
                              (MANIFEST_NAME, manifest_bytes(manifest))):
            atomic_write_bytes(out / name, payload)
            written.append(out / name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return out


def verify_export(directory: str | os.PathLike[str], threads: int = 1) -> dict[str, Any]:
    """Re-load the exported file, run it on the fixed input and compare with the manifest (QatError if not)."""
    manifest = read_manifest(directory)
    fmt = _format(manifest["engine"])
    path = Path(directory) / manifest["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise QatError(str(path), "does not exist", "export the model again") from exc
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise QatError(str(path), "does not match the sha256 in its manifest (corrupted or replaced)",
                       "export the model again")
    x = fixed_input(manifest["input_shape"], manifest["input_seed"])
    raw = Path(directory) / manifest["input_file"]
    if raw.exists() and not np.array_equal(np.frombuffer(raw.read_bytes(), "<f4"), x.numpy().reshape(-1)):
        raise QatError(str(raw), "differs from the fixed input its manifest's seed generates", "export again")
    try:
        output = fmt.load(data, threads)(x).detach().float()
    except QatError as exc:
        raise QatError(str(path), exc.problem, exc.fix) from exc
    expected = torch.tensor(manifest["expected_output"], dtype=torch.float32).reshape(manifest["output_shape"])
    if output.shape != expected.shape:
        raise QatError(str(path), f"gives output shape {list(output.shape)}, manifest says {manifest['output_shape']}",
                       "export the model again")
    diff = (output - expected).abs()
    tol = manifest["tolerance"]
    bound = tol["atol"] + tol["rtol"] * expected.abs()
    if bool((diff > bound).any()):
        raise QatError(str(path), f"output differs from the manifest by up to {float(diff.max()):.3g} "
                       f"(tolerance atol={tol['atol']:.3g}, rtol={tol['rtol']:.3g})",
                       "check the engine version and machine, or export again")
    return {"file": str(path), "max_abs_diff": float(diff.max()), "ok": True}
