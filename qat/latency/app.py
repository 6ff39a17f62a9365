"""The latency app (``experiments/latency.py``, config ``configs/latency_app.yaml``): measure one model, or every
model of a multirun tree, on one engine, each in a fresh subprocess, and write ``qat.latency/1`` records.

Tree mode needs only the run directories (record.json, int_model.pt), so it can run on another machine than the
training; a model the engine cannot run is listed as ``unsupported`` with the reason (stderr and
``jobs-latency-*.json``), never measured on another engine.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qat.engines.registry import adapter
from qat.errors import QatError
from qat.latency.jobs import Job, float_job, model_job, run_job, tree_jobs
from qat.latency.subprocess import MeasureSpec
from qat.records import atomic_write_bytes


@dataclass
class LatencyAppConfig:
    """The latency app's config (``configs/latency_app.yaml`` documents each key)."""

    int_model: str | None = None
    arch: str | None = None
    width_mult: float = 1.0
    num_classes: int = 1000
    weights: str | None = None
    tree: str | None = None
    shard: int = 0
    num_shards: int = 1
    model_id: str | None = None
    engine: str = "torch_native_x86"
    float_engine: str = "torch_eager"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    resolution: int | None = None
    warmup: int = 10
    repeats: int = 50
    min_time_s: float = 0.5
    affinity: Any = "auto"
    seed: int = 0
    timeout_s: float = 900.0
    out: str | None = None


def base_spec(cfg: LatencyAppConfig, engine: str, precision: str) -> MeasureSpec:
    """The measurement settings every job of this invocation shares."""
    affinity = cfg.affinity if isinstance(cfg.affinity, str) else [int(c) for c in cfg.affinity]
    return MeasureSpec(engine=engine, precision=precision, width_mult=cfg.width_mult, num_classes=cfg.num_classes,
                       weights=cfg.weights, resolution=cfg.resolution, batch=cfg.batch, threads=cfg.threads,
                       warmup=cfg.warmup, repeats=cfg.repeats, min_time_s=cfg.min_time_s, affinity=affinity,
                       seed=cfg.seed)


def plan(cfg: LatencyAppConfig) -> list[Job]:
    """The jobs of this invocation; bad keys, unknown or missing engines fail here, before any measurement."""
    chosen = [key for key, value in (("int_model", cfg.int_model), ("arch", cfg.arch), ("tree", cfg.tree)) if value]
    if len(chosen) != 1:
        raise QatError("int_model", f"give exactly one of int_model=, arch=, tree= (got {len(chosen) or 'none'})",
                       "int_model=<file or run dir> | arch=<name> resolution=<px> out=<dir> | tree=<dir>")
    int_base = base_spec(cfg, cfg.engine, "int8")
    float_base = base_spec(cfg, cfg.float_engine, "float")
    if cfg.int_model:
        jobs = [model_job(cfg.int_model, int_base, model_id=cfg.model_id, out=cfg.out)]
    elif cfg.arch:
        jobs = [float_job(cfg.arch, float_base, model_id=cfg.model_id, out=cfg.out)]
    else:
        if cfg.model_id:
            raise QatError("model_id", "tree mode takes each run's own model id", "leave model_id unset")
        jobs = tree_jobs(cfg.tree or "", int_base, float_base, out=cfg.out, shard=cfg.shard,
                         num_shards=cfg.num_shards)
    specs = [job.spec for job in jobs if job.spec is not None]
    for spec in {(s.engine, s.precision): s for s in specs}.values():
        try:
            adapter(spec.engine)  # unknown or not installed: one line, here
        except QatError as exc:
            raise app_error(exc, spec) from None
    for spec in specs:
        try:
            spec.check()
        except QatError as exc:
            raise app_error(exc, spec) from None
    return jobs


def app_error(exc: QatError, spec: MeasureSpec) -> QatError:
    """``exc`` with this app's key for the run config's ``latency.*`` key it names (``latency.engine`` is
    ``engine`` for int8 and ``float_engine`` for float measurements; ``latency.model`` is ``int_model``)."""
    if exc.key == "latency.engine":
        key = "engine" if spec.precision == "int8" else "float_engine"
    elif exc.key == "latency.model":
        key = "int_model"
    else:
        key = exc.key.removeprefix("latency.")
    return QatError(key, exc.problem, exc.fix)


def summary_name(cfg: LatencyAppConfig) -> str:
    """The tree mode's summary file: every job of this invocation, measured or ``unsupported``."""
    return (f"jobs-latency-{cfg.device}-{cfg.engine}-{cfg.float_engine}-t{cfg.threads}-b{cfg.batch}"
            f"-shard{cfg.shard}of{cfg.num_shards}.json")


def run(cfg: LatencyAppConfig) -> int:
    """Plan, then measure one job after the other; bad input is a :class:`QatError` before any measurement (with
    one model, that model's failure too); in tree mode a model the engine cannot run is listed and skipped."""
    jobs = plan(cfg)
    if not cfg.tree:  # one model: its errors are the command's errors
        path, record = run_job(jobs[0], device=cfg.device, timeout_s=cfg.timeout_s)
        print(f"{record['model_id']}  {record['engine']}  {record['median_ms']:.3f} ms (median of {record['n']}, "
              f"p10 {record['p10_ms']:.3f}, p90 {record['p90_ms']:.3f})  -> {path}")
        return 0
    summary = []
    for job in jobs:
        try:
            path, record = run_job(job, device=cfg.device, timeout_s=cfg.timeout_s)
        except QatError as exc:
            print(f"unsupported: {job.model_id} ({job.source}): {exc.one_line()}", file=sys.stderr)
            summary.append({"model_id": job.model_id, "source": str(job.source), "status": "unsupported",
                            "reason": exc.one_line()})
            continue
        print(f"{record['model_id']}  {record['engine']}  {record['median_ms']:.3f} ms  -> {path}")
        summary.append({"model_id": job.model_id, "source": str(job.source), "status": "ok", "record": str(path),
                        "engine": record["engine"], "median_ms": record["median_ms"]})
    destination = Path(cfg.out or cfg.tree or ".") / summary_name(cfg)
    atomic_write_bytes(destination, (json.dumps(summary, indent=1) + "\n").encode())
    measured = sum(item["status"] == "ok" for item in summary)
    print(f"{measured} of {len(summary)} models measured; summary -> {destination}")
    return 0


__all__ = ["LatencyAppConfig", "app_error", "base_spec", "plan", "run", "summary_name"]
