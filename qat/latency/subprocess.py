"""One latency measurement per fresh subprocess, with threads and CPU affinity fixed before anything runs.

Measurements in one long-lived process disturb each other (thread pools created by an earlier engine, the
x86 backend slowing down after a large batch, allocator state), so each :class:`MeasureSpec` runs in its own
``python -m qat.latency.subprocess SPEC RESULT`` child:

1. the parent sets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` to ``threads`` in the
   child's environment (read by the OpenMP and BLAS runtimes when they start);
2. the child pins itself with ``os.sched_setaffinity`` where the OS has it (``affinity="auto"``: the first
   ``threads`` CPUs it may use; a list: those CPUs; ``"none"``: no pinning), then imports torch and calls
   ``torch.set_num_threads(threads)`` and ``torch.set_num_interop_threads(1)``;
3. it builds the engine (:mod:`qat.engines.registry`), times it with :func:`qat.latency.harness.measure`
   (warm-up, repeats and a time budget; median, p10, p90, mean, std, n) and writes a JSON result file
   atomically: the statistics, the engine and its version, the threads it really ran with
   (``torch.get_num_threads()``, the engine's own pool where it has one), its affinity and
   :func:`qat.latency.host.describe_host`.

A bad spec, an engine that is not installed, or a model the engine cannot run comes back as a
:class:`QatError` raised in the parent (one line naming the key); nothing falls back to another engine or to
float.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qat.errors import QatError

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PRECISIONS = ("float", "int8")
TASKS = ("classification", "detection")
ENGINE_FILES = {"onnxruntime": ("qat.engines.onnxruntime_qdq", "load"),
                "executorch_xnnpack": ("qat.engines.executorch_xnnpack", "load_pte")}
"""Engines that can load a compiled file (module, loader): lowering once, measuring at many thread counts."""


@dataclass
class MeasureSpec:
    """What one subprocess measures. ``int8``: a saved ``int_model.pt``; ``float``: a model-registry spec."""

    engine: str
    precision: str = "int8"
    int_model: str | None = None  # int8: path of a file written by IntModel.save
    # classification: the model alone; detection: the whole detector (the core on the engine, box decoding and
    # NMS in float around it, qat.detection.latency) and then its core alone ("core_*" statistics)
    task: str = "classification"
    arch: str | None = None  # float: qat.models.build_model arguments (detection: the backbone)
    width_mult: float = 1.0
    num_classes: int = 1000
    weights: str | None = None  # float: optional state-dict file (latency does not depend on the values)
    resolution: int | None = None  # None: the integer model's own input size
    batch: int = 1
    threads: int = 1
    warmup: int = 10
    repeats: int = 50
    min_time_s: float = 0.0
    affinity: str | list[int] = "auto"  # "auto" | "none" | explicit CPU ids
    engine_file: str | None = None  # a compiled .onnx / .pte (qat.export) to load instead of building the engine
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Cheap checks in the parent, before a process is started."""
        from qat.engines.registry import ENGINES, entry

        e = entry(self.engine)
        if self.task not in TASKS:
            raise QatError("latency.task", f"unknown task {self.task!r}", f"use one of: {', '.join(TASKS)}")
        if self.precision not in PRECISIONS:
            raise QatError("latency.precision", f"unknown value {self.precision!r}", "use float or int8")
        if self.precision not in e.precisions:
            runs = [n for n, other in ENGINES.items() if self.precision in other.precisions]
            raise QatError("latency.engine", f"engine {self.engine!r} has no {self.precision} path",
                           f"for {self.precision} choose one of: {', '.join(runs)}")
        for key in ("batch", "threads", "repeats"):
            if int(getattr(self, key)) < 1:
                raise QatError(f"latency.{key}", f"{getattr(self, key)} is not a positive count", "use 1 or more")
        if self.warmup < 0 or self.min_time_s < 0:
            raise QatError("latency.warmup", f"warmup={self.warmup}, min_time_s={self.min_time_s}",
                           "use warmup >= 0 and min_time_s >= 0")
        if self.resolution is not None and self.resolution < 1:
            raise QatError("latency.resolution", f"{self.resolution} is not a positive size", "use e.g. 224")
        if self.precision == "int8":
            if not self.int_model or not Path(self.int_model).is_file():
                raise QatError("latency.model", f"integer model {self.int_model!r} does not exist",
                               "give the path of an int_model.pt written by qat")
        elif not self.arch:
            raise QatError("latency.arch", "a float measurement needs a model architecture", "set arch=...")
        elif self.resolution is None:
            raise QatError("latency.resolution", "a float measurement needs an input resolution", "set e.g. 224")
        if self.engine_file is not None:
            if self.engine not in ENGINE_FILES:
                raise QatError("latency.engine_file", f"engine {self.engine!r} does not load compiled files",
                               f"engine files are for: {', '.join(ENGINE_FILES)}")
            if not Path(self.engine_file).is_file():
                raise QatError("latency.engine_file", f"{self.engine_file} does not exist",
                               "give a .onnx / .pte file written by qat.export")
        _cpu_list(self.affinity, self.threads)


def _cpu_list(affinity: str | list[int], threads: int) -> list[int] | None:
    """The CPUs to pin to, or ``None`` (no pinning, or no ``sched_setaffinity`` on this OS)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if affinity == "none":
        return None
    if affinity == "auto":
        return allowed[:threads] if len(allowed) >= threads else allowed
    if isinstance(affinity, str) or not all(isinstance(c, int) for c in affinity) or not affinity:
        raise QatError("latency.affinity", f"{affinity!r} is not auto, none or a list of CPU ids",
                       f"e.g. affinity=[0] (this process may use CPUs {allowed})")
    outside = sorted(set(affinity) - set(allowed))
    if outside:
        raise QatError("latency.affinity", f"CPUs {outside} are not available to this process",
                       f"choose among {allowed}")
    return sorted(set(affinity))


def child_env(threads: int) -> dict[str, str]:
    """The child's environment: thread counts fixed, and this qat importable even when not installed."""
    env = dict(os.environ)
    for name in THREAD_ENV:
        env[name] = str(threads)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def measure_in_subprocess(spec: MeasureSpec, *, timeout_s: float = 900.0,
                          python: str | None = None) -> dict[str, Any]:
    """Run ``spec`` in a fresh process and return its result: ``stats`` (harness statistics), ``engine``
    (name and version), ``child`` (threads and affinity it ran with) and ``host``."""
    spec.check()
    with tempfile.TemporaryDirectory(prefix="qat-latency-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        command = [python or sys.executable, "-m", "qat.latency.subprocess", str(spec_path), str(result_path)]
        try:
            proc = subprocess.run(command, env=child_env(spec.threads), capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise QatError("latency.timeout_s", f"the measurement of {spec.engine} ran longer than {timeout_s} s",
                           "lower repeats/min_time_s or raise timeout_s") from exc
        if not result_path.exists():
            raise QatError("latency.engine", f"the measurement subprocess ({spec.engine}, {spec.precision}) died "
                           f"with exit status {proc.returncode}: {_last_line(proc.stderr or proc.stdout)}",
                           "run it with QAT_DEBUG=1 for the full output")
        result = json.loads(result_path.read_text())
    if not result.get("ok"):
        error = result["error"]
        if os.environ.get("QAT_DEBUG") and result.get("traceback"):
            print(result["traceback"], file=sys.stderr)
        raise QatError(error["key"], error["problem"], error.get("fix", ""))
    return result


# ----------------------------------------------------------------------------------------------------------
# child side
# ----------------------------------------------------------------------------------------------------------

def _pin(spec: MeasureSpec) -> list[int] | None:
    cpus = _cpu_list(spec.affinity, spec.threads)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _load_engine_file(spec: MeasureSpec, shape: list[int]):  # type: ignore[no-untyped-def]
    import importlib

    import torch

    module, loader = ENGINE_FILES[spec.engine]
    fn = getattr(importlib.import_module(module), loader)(spec.engine_file, threads=spec.threads)
    return fn, torch.randn(*shape, generator=torch.Generator().manual_seed(spec.seed))


def _build(spec: MeasureSpec):  # type: ignore[no-untyped-def]  # -> (engine callable, example tensor)
    import dataclasses

    import torch

    from qat.engines.registry import build_float, build_int

    generator = torch.Generator().manual_seed(spec.seed)
    if spec.precision == "int8":
        from qat.intmodel.graph import IntModel

        model = IntModel.load(spec.int_model or "")
        own = list(model.input_shape)
        channels = own[1] if len(own) == 4 else 3
        if spec.resolution is not None:
            size = [spec.resolution, spec.resolution]
        elif len(own) == 4:
            size = own[2:]
        else:
            raise QatError("latency.resolution", f"{spec.int_model} does not record its input size",
                           "set resolution=...")
        shape = [spec.batch, channels, *size]
        if spec.engine_file:
            return _load_engine_file(spec, shape)
        if shape != own:  # engines that compile for one input shape (ExecuTorch) compile for this one
            model = dataclasses.replace(model, input_shape=shape)
        example = torch.randn(*shape, generator=generator)
        return build_int(spec.engine, model, spec.threads), example
    from qat.models import build_model

    resolution = int(spec.resolution or 0)
    if spec.engine_file:
        return _load_engine_file(spec, [spec.batch, 3, resolution, resolution])
    module = build_model(spec.arch or "", width_mult=spec.width_mult, num_classes=spec.num_classes,
                         resolution=resolution, weights=spec.weights).eval()
    example = torch.randn(spec.batch, 3, resolution, resolution, generator=generator)
    return build_float(spec.engine, module, example, spec.threads), example


def _engine_threads(engine: str, fn: object) -> int | None:
    if engine == "executorch_xnnpack":
        from qat.engines.executorch_xnnpack import pool_threads

        return pool_threads()
    threads = getattr(fn, "threads", None)
    return int(threads) if isinstance(threads, int) else None


def run_spec(spec: MeasureSpec) -> dict[str, Any]:
    """The child's work: pins *the calling process* (affinity), fixes its threads, builds, measures."""
    affinity = _pin(spec)
    import torch

    from qat.engines.registry import engine_info
    from qat.latency.harness import measure
    from qat.latency.host import describe_host

    torch.set_num_threads(spec.threads)
    with contextlib.suppress(RuntimeError):  # already set (in-process use after parallel work started)
        torch.set_num_interop_threads(1)
    scopes: dict[str, Any] = {}
    if spec.task == "detection":
        from qat.detection.latency import build_for_latency

        fn, example, core, core_example = build_for_latency(spec)
        core_stats = measure(core, core_example, threads=spec.threads, warmup=spec.warmup, repeats=spec.repeats,
                             min_time_s=spec.min_time_s).as_dict()
        scopes = {"scope": "detector (core + float post-processing)",
                  **{f"core_{name}": value for name, value in core_stats.items()}}
    else:
        fn, example = _build(spec)
    stats = measure(fn, example, threads=spec.threads, warmup=spec.warmup, repeats=spec.repeats,
                    min_time_s=spec.min_time_s)
    child = {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
             "torch_interop_threads": torch.get_num_interop_threads(),
             "engine_threads": _engine_threads(spec.engine, fn), "affinity": affinity,
             "env": {name: os.environ.get(name) for name in THREAD_ENV},
             "emulated_bits": bool(getattr(fn, "emulated_bits", False))}
    return {"stats": stats.as_dict(), "engine": engine_info(spec.engine), "child": child, "host": describe_host(),
            "input_shape": list(example.shape), "scopes": scopes}


def _child_main(spec_path: str, result_path: str) -> int:
    from qat.records import atomic_write_bytes

    raw = json.loads(Path(spec_path).read_text())
    spec = MeasureSpec(**{f.name: raw[f.name] for f in fields(MeasureSpec) if f.name in raw})
    try:
        payload: dict[str, Any] = {"ok": True, **run_spec(spec)}
        status = 0
    except QatError as exc:
        payload = {"ok": False, "error": {"key": exc.key, "problem": exc.problem, "fix": exc.fix},
                   "traceback": traceback.format_exc()}
        status = 2
    except Exception as exc:  # noqa: BLE001 - an engine failing on this model: reported, never a fallback
        reason = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else ""
        payload = {"ok": False, "traceback": traceback.format_exc(), "error": {
            "key": "latency.engine",
            "problem": f"engine {spec.engine!r} cannot run this {spec.precision} model "
                       f"({type(exc).__name__}: {reason})",
            "fix": "choose another engine for this model (QAT_DEBUG=1 shows the traceback)"}}
        status = 3
    atomic_write_bytes(result_path, json.dumps(payload, default=str).encode())
    return status


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
