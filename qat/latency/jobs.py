"""Latency jobs: what to measure (one model, or every run of a multirun tree) and the records they produce.

A job needs only files: a run directory's ``record.json`` (model id, architecture, precision) and, for an
integer run, its ``int_model.pt``. Float runs are measured on a float model of the same architecture, width,
resolution and classes with random weights (latency does not depend on the weight values). So a tree copied
to another machine can be measured there, and the records copied back (or written straight into a store).
Each measurement runs in its own subprocess (:mod:`qat.latency.subprocess`), one after the other, so the
measurements of one job never overlap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qat.errors import QatError
from qat.latency.record import latency_record, write_latency_record
from qat.latency.subprocess import MeasureSpec, measure_in_subprocess
from qat.records import RECORD_NAME

INT_MODEL_NAME = "int_model.pt"


@dataclass
class Job:
    """One model to measure: ``spec`` is ``None`` when it cannot be measured (``reason`` says why)."""

    model_id: str
    source: Path  # the int_model.pt or record.json it came from
    out_dir: Path
    spec: MeasureSpec | None
    reason: str = ""


def _record_next_to(path: Path) -> dict[str, Any] | None:
    candidate = path.parent / RECORD_NAME if path.is_file() else path / RECORD_NAME
    if not candidate.is_file():
        return None
    try:
        record = json.loads(candidate.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QatError(str(candidate), f"is not valid JSON ({exc})", "re-run the training or remove the file") from None
    return record if isinstance(record, dict) else None


def model_job(model: str | Path, base: MeasureSpec, *, model_id: str | None, out: str | Path | None) -> Job:
    """An int8 job for an ``int_model.pt`` (or a run directory holding one); the model id comes from
    ``model_id`` or the run's ``record.json``."""
    path = Path(model)
    if path.is_dir():
        path = path / INT_MODEL_NAME
    if not path.is_file():
        raise QatError("int_model", f"{path} does not exist", "give an int_model.pt or the run directory holding it")
    record = _record_next_to(path)
    model_id = model_id or (record or {}).get("model_id")
    if not model_id:
        raise QatError("model_id", f"no record.json next to {path} names the model", "set model_id=...")
    spec = replace(base, precision="int8", int_model=str(path.resolve()))
    return Job(str(model_id), path, Path(out) if out else path.parent, spec)


def float_job(arch: str, base: MeasureSpec, *, model_id: str | None, out: str | Path | None) -> Job:
    """A float job for a model-registry spec (``base`` carries width, classes, resolution, weights)."""
    if out is None:
        raise QatError("out", "a float model spec has no directory of its own", "set out=<directory>")
    spec = replace(base, precision="float", arch=arch)
    default_id = f"{arch}-w{spec.width_mult:g}-r{spec.resolution}-float-{'weights' if spec.weights else 'random'}"
    return Job(model_id or default_id, Path(arch), Path(out), spec)


def tree_jobs(tree: str | Path, int_base: MeasureSpec, float_base: MeasureSpec, *, out: str | Path | None = None,
              shard: int = 0, num_shards: int = 1) -> list[Job]:
    """One job per ``record.json`` under ``tree`` (sorted; this shard's share only). Records are written next to
    each run, or under ``out`` mirroring the tree."""
    root = Path(tree)
    if not root.is_dir():
        raise QatError("tree", f"{root} is not a directory", "give a multirun (or runs) directory")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise QatError("shard", f"shard {shard} of {num_shards}", "use 0 <= shard < num_shards")
    records = sorted(root.rglob(RECORD_NAME))
    if not records:
        raise QatError("tree", f"no {RECORD_NAME} under {root}", "give the directory of a finished multirun")
    jobs = []
    for path in records[shard::num_shards]:
        run_dir = path.parent
        out_dir = Path(out) / run_dir.relative_to(root) if out else run_dir
        record = _record_next_to(run_dir) or {}
        model_id = str(record.get("model_id") or "")
        precision = (record.get("quant") or {}).get("precision")
        model = record.get("model") or {}
        if not model_id or precision not in ("float", "int8"):
            jobs.append(Job(model_id or "?", path, out_dir, None, "record lacks model_id or quant.precision"))
        elif precision == "int8":
            int_path = run_dir / INT_MODEL_NAME
            if int_path.is_file():
                jobs.append(Job(model_id, int_path, out_dir, replace(int_base, int_model=str(int_path.resolve()))))
            else:
                jobs.append(Job(model_id, path, out_dir, None, f"no {INT_MODEL_NAME} in {run_dir}"))
        elif not model.get("arch") or not model.get("resolution"):
            jobs.append(Job(model_id, path, out_dir, None, "record lacks model.arch / model.resolution"))
        else:
            spec = replace(float_base, arch=str(model["arch"]), width_mult=float(model.get("width_mult", 1.0)),
                           num_classes=int(model.get("num_classes", 1000)),
                           resolution=float_base.resolution or int(model["resolution"]))
            jobs.append(Job(model_id, path, out_dir, spec))
    return jobs


def run_job(job: Job, *, device: str, timeout_s: float = 900.0) -> tuple[Path, dict[str, Any]]:
    """Measure ``job`` in a fresh subprocess and write its latency record; returns ``(path, record)``."""
    if job.spec is None:
        raise QatError("latency.engine", f"{job.source}: {job.reason}", "this model cannot be measured")
    spec = job.spec
    result = measure_in_subprocess(spec, timeout_s=timeout_s)
    stats = result["stats"]
    record = latency_record(
        model_id=job.model_id, engine=spec.engine, engine_version=result["engine"].get("engine_version"),
        device=device, threads=spec.threads, batch=spec.batch, stats=stats, host=result["host"],
        precision=spec.precision, resolution=result["input_shape"][-1], input_shape=result["input_shape"],
        warmup=stats["warmup"], min_time_s=spec.min_time_s, child=result["child"],
        weights=(spec.weights or "random-init") if spec.precision == "float" else None,
        source={"kind": "qat.latency.subprocess", "model": str(job.source)})
    return write_latency_record(record, job.out_dir), record
