"""Latencies measured elsewhere (a phone, a board) -> ``qat.latency/1`` records in the results store.

Formats (``FORMATS``), as the tools print them:

``executorch_runner``
    the log of ExecuTorch's ``executor_runner`` (``--num_executions N``): per-run lines
    ``I 00:00:01.234567 executorch:executor_runner.cpp:NNN] Iteration 3 of 50: 4.125000 ms``, the summary
    ``Model executed successfully 50 time(s) in 206.250000 ms.`` and ``Resetting threadpool with num threads
    = 4`` (threads). With per-run lines the statistics are exact; with the summary only (older runners),
    ``median_ms`` is the mean and the record says so (``median_is_mean: true``).
``executorch_minibench``
    ``benchmark_results.json`` of ExecuTorch's Android benchmark app (minibench): a JSON list of
    ``{"benchmarkModel": {"name", "backend", "quantization"}, "metric": "avg_inference_latency(ms)",
    "actualValue": ..., "deviceInfo": {"device", "arch", "os"}}``; a mean, so ``median_is_mean: true``.
    The model id defaults to the ``.pte`` file name (``qat.export`` names it ``<model_id>.pte``).
``onnxruntime_perf_test``
    the console output of ``onnxruntime_perf_test`` (``Total inference requests: N``, ``Average inference
    time cost: X ms`` and, where printed, ``P50 Latency: X s`` / ``P90 Latency: X s``).
``onnxruntime_perf_result``
    the result file ``onnxruntime_perf_test`` appends (one ``model,seconds,peak_bytes,cpu%,run`` line per
    run, then the percentile lines): exact statistics from the per-run times.
``csv``
    a plain CSV with header ``model_id,device,engine,threads,batch,ms``: one timed run per row; rows with the
    same (model id, device, engine, threads, batch) make one record.

What a tool does not print (model id, device, engine, threads, batch) comes from the caller or from an
export manifest. A malformed file is a :class:`QatError` naming ``file:line``; nothing is written then.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qat.errors import QatError, choice_error
from qat.latency.harness import summarize
from qat.latency.record import latency_filename, latency_record, write_latency_record

_NUMBER = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
CSV_COLUMNS = ("model_id", "device", "engine", "threads", "batch", "ms")


@dataclass
class Measured:
    """One measurement read from a file: statistics plus whatever the file itself says about the run."""

    stats: dict[str, Any]
    line: int
    fields: dict[str, Any] = field(default_factory=dict)  # model_id, device, engine, threads, batch if known
    extra: dict[str, Any] = field(default_factory=dict)


def _error(path: Path, line: int | None, problem: str, fix: str) -> QatError:
    return QatError(f"{path}:{line}" if line else str(path), problem, fix)


def _stats_of_times(times_ms: list[float]) -> dict[str, Any]:
    stats = summarize([t / 1e3 for t in times_ms], warmup=0, threads=0, batch=0).as_dict()
    return {k: stats[k] for k in ("median_ms", "p10_ms", "p90_ms", "mean_ms", "std_ms", "n")}


def _positive(path: Path, line: int, text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _error(path, line, f"{what} {text!r} is not a number", "give the tool's unedited output") from None
    if not value > 0:
        raise _error(path, line, f"{what} {value} is not positive", "give the tool's unedited output")
    return value


def parse_executorch_runner(path: Path, text: str) -> list[Measured]:
    iteration = re.compile(r"Iteration (\d+) of (\d+): " + _NUMBER + r" ms")
    total = re.compile(r"Model executed successfully (\d+) time\(s\) in " + _NUMBER + r" ms")
    pool = re.compile(r"Resetting threadpool with num threads = (-?\d+)")
    times: list[float] = []
    summary: tuple[int, float, int] | None = None
    threads: int | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if "Execution of method" in line and "failed" in line:
            raise _error(path, number, "the model failed on the device", "fix the run; no latency was measured")
        if m := iteration.search(line):
            times.append(_positive(path, number, m.group(3), "iteration time"))
        elif m := total.search(line):
            summary = (int(m.group(1)), _positive(path, number, m.group(2), "total time"), number)
        elif m := pool.search(line):
            threads = int(m.group(1)) if int(m.group(1)) > 0 else None
    if summary is None:
        raise _error(path, None, "no 'Model executed successfully N time(s) in X ms.' line",
                     "give the complete log of executor_runner")
    count, total_ms, where = summary
    fields: dict[str, Any] = {"threads": threads} if threads else {}
    if times:
        if len(times) != count:
            raise _error(path, where, f"{len(times)} 'Iteration' lines but the summary counts {count} runs",
                         "give the complete, unedited log")
        return [Measured(_stats_of_times(times), where, fields)]
    mean = total_ms / count
    return [Measured({"median_ms": mean, "mean_ms": mean, "n": count}, where, fields, {"median_is_mean": True})]


def parse_executorch_minibench(path: Path, text: str) -> list[Measured]:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(path, exc.lineno, f"is not valid JSON ({exc.msg})", "give benchmark_results.json") from None
    if not isinstance(entries, list):
        raise _error(path, 1, "is not a JSON list of benchmark metrics", "give benchmark_results.json")
    out: list[Measured] = []
    for index, entry in enumerate(entries):
        where = f"entry {index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("benchmarkModel"), dict) or "metric" not in entry:
            raise QatError(f"{path}#{index}", f"{where} lacks benchmarkModel/metric", "give benchmark_results.json")
        model = entry["benchmarkModel"]
        name = "_".join(str(model.get(k)) for k in ("name", "backend", "quantization") if model.get(k))
        device_info = entry.get("deviceInfo") or {}
        device = " ".join(str(device_info[k]) for k in ("device", "arch") if device_info.get(k)) or None
        if entry["metric"] == "load_status" and entry.get("actualValue") not in (0, 0.0):
            raise QatError(f"{path}#{index}", f"model {name!r} failed to load on the device (load_status "
                           f"{entry.get('actualValue')})", "fix the .pte for this device; no latency was measured")
        if entry["metric"] != "avg_inference_latency(ms)":
            continue
        value = entry.get("actualValue")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise QatError(f"{path}#{index}", f"{where}: actualValue {value!r} is not a positive number",
                           "give the app's unedited output")
        trimmed = next((e.get("actualValue") for e in entries if isinstance(e, dict)
                        and e.get("metric") == "trimmean_inference_latency(ms)" and e.get("benchmarkModel") == model),
                       None)
        extra: dict[str, Any] = {"median_is_mean": True, "device_info": device_info}
        if trimmed is not None:
            extra["trimmean_ms"] = trimmed
        fields = {"model_id": name or None, "device": device}
        out.append(Measured({"median_ms": float(value), "mean_ms": float(value)}, index + 1,
                            {k: v for k, v in fields.items() if v}, extra))
    if not out:
        raise _error(path, None, "holds no avg_inference_latency(ms) metric", "give benchmark_results.json")
    return out


def parse_onnxruntime_perf_test(path: Path, text: str) -> list[Measured]:
    keys = {"Total inference requests": ("n", 1.0, ""), "Average inference time cost": ("mean_ms", 1.0, "ms"),
            "P50 Latency": ("median_ms", 1e3, "s"), "P90 Latency": ("p90_ms", 1e3, "s")}
    found: dict[str, float] = {}
    where = 0
    for number, line in enumerate(text.splitlines(), 1):
        label, sep, rest = line.partition(":")
        if not sep or label.strip() not in keys:
            continue
        name, scale, unit = keys[label.strip()]
        value_text = rest.strip().removesuffix(unit).strip() if unit else rest.strip()
        found[name] = _positive(path, number, value_text, label.strip()) * scale
        where = where or number
    if "mean_ms" not in found or "n" not in found:
        raise _error(path, None, "no 'Total inference requests' / 'Average inference time cost' lines",
                     "give the complete console output of onnxruntime_perf_test")
    stats: dict[str, Any] = {**found, "n": int(found["n"])}
    extra: dict[str, Any] = {}
    if "median_ms" not in stats:
        stats["median_ms"], extra["median_is_mean"] = stats["mean_ms"], True
    return [Measured(stats, where, {}, extra)]


def parse_onnxruntime_perf_result(path: Path, text: str) -> list[Measured]:
    times: list[float] = []
    names: set[str] = set()
    first = 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if re.match(r"^\s*(Min|Max|P\d+) Latency:", line):
            continue  # percentile lines after the runs: recomputed from the runs
        parts = line.split(",")
        if len(parts) != 5:
            raise _error(path, number, f"expected 'model,seconds,peak_bytes,cpu,run', got {line.strip()[:80]!r}",
                         "give the result file onnxruntime_perf_test wrote")
        times.append(_positive(path, number, parts[1].strip(), "run time (s)") * 1e3)
        names.add(parts[0].strip())
        first = first or number
    if not times:
        raise _error(path, None, "holds no per-run line", "give the result file onnxruntime_perf_test wrote")
    fields = {"model_id": names.pop()} if len(names) == 1 and "" not in names else {}
    return [Measured(_stats_of_times(times), first, fields)]


def parse_csv(path: Path, text: str) -> list[Measured]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise _error(path, 1, f"header lacks {', '.join(missing)}", "header: " + ",".join(CSV_COLUMNS))
    groups: dict[tuple[str, str, str, int, int], tuple[list[float], int]] = {}
    for row in reader:
        number = reader.line_num
        if None in row or any(row.get(c) in (None, "") for c in CSV_COLUMNS):
            raise _error(path, number, "row has empty or extra cells", "one value per column: " + ",".join(CSV_COLUMNS))
        try:
            threads, batch = int(row["threads"]), int(row["batch"])
        except ValueError:
            raise _error(path, number, f"threads {row['threads']!r} / batch {row['batch']!r} are not integers",
                         "write whole numbers") from None
        if threads < 1 or batch < 1:
            raise _error(path, number, f"threads={threads}, batch={batch}", "use positive counts")
        key = (row["model_id"].strip(), row["device"].strip(), row["engine"].strip(), threads, batch)
        times, first = groups.setdefault(key, ([], number))
        times.append(_positive(path, number, row["ms"].strip(), "ms"))
    if not groups:
        raise _error(path, 2, "holds no data row", "one row per timed run")
    out = []
    for (model_id, device, engine, threads, batch), (times, first) in groups.items():
        fields = {"model_id": model_id, "device": device, "engine": engine, "threads": threads, "batch": batch}
        out.append(Measured(_stats_of_times(times), first, fields))
    return out


FORMATS: dict[str, tuple[Callable[[Path, str], list[Measured]], str | None]] = {
    "executorch_runner": (parse_executorch_runner, "executorch_xnnpack"),
    "executorch_minibench": (parse_executorch_minibench, "executorch_xnnpack"),
    "onnxruntime_perf_test": (parse_onnxruntime_perf_test, "onnxruntime"),
    "onnxruntime_perf_result": (parse_onnxruntime_perf_result, "onnxruntime"),
    "csv": (parse_csv, None),
}
"""format -> (parser, default engine name)."""


def ingest_file(path: str | Path, fmt: str, *, model_id: str | None = None, device: str | None = None,
                engine: str | None = None, threads: int | None = None, batch: int | None = None,
                extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The ``qat.latency/1`` records of one file. Arguments fill what the file does not say; a value the file
    states wins, except ``model_id``/``device``/``engine`` given here, which rename (e.g. a phone's name)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise choice_error("ingest.format", fmt, list(FORMATS))
    if not path.is_file():
        raise QatError(str(path), "does not exist", "give the file the tool wrote")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise _error(path, None, f"is not text ({exc.reason})", "give the tool's text output") from None
    parser, default_engine = FORMATS[fmt]
    records = []
    for measured in parser(path, text):
        given = {"model_id": model_id, "device": device, "engine": engine}
        values = {**{"engine": default_engine, "threads": threads, "batch": batch}, **measured.fields,
                  **{k: v for k, v in given.items() if v}}
        for key in ("model_id", "device", "engine"):
            if not values.get(key):
                raise _error(path, measured.line, f"the file does not say the {key}", f"give {key}=...")
        records.append(latency_record(
            model_id=str(values["model_id"]), engine=str(values["engine"]), device=str(values["device"]),
            threads=values.get("threads"), batch=values.get("batch"), stats=measured.stats,
            host={"device": values["device"]},
            source={"format": fmt, "file": str(path.resolve()), "line": measured.line}, **measured.extra,
            **(extra or {})))
    return records


def ingest_files(files: list[str | Path], fmt: str, out: str | Path, *, manifest: str | Path | None = None,
                 model_id: str | None = None, device: str | None = None, engine: str | None = None,
                 threads: int | None = None, batch: int | None = None) -> list[Path]:
    """The ingest app (``experiments/ingest.py``): parse every file, then write every record into the results
    store ``out``; returns the written paths. ``manifest`` (a ``qat.export`` directory) gives the model id, engine
    and batch of the exported file that was run, where not given. Nothing is written when any file is malformed or
    two measurements would share one record file. Keys of errors are the app's options (``--threads``)."""
    from qat.export.manifest import read_manifest  # torch and the exporters: only when a manifest is given

    extra: dict[str, Any] = {}
    if manifest:
        info = read_manifest(manifest)
        model_id = model_id or info["model_id"]
        engine = engine or info["engine"]
        batch = batch or int(info["input_shape"][0])
        extra = {"export": {"file": info["file"], "sha256": info["sha256"], "precision": info["precision"],
                            "resolution": info["input_shape"][2:]}}
    for key, value in (("--threads", threads), ("--batch", batch)):
        if value is not None and value < 1:
            raise QatError(key, f"{value} is not a positive count", "use 1 or more")
    records = []
    for file in files:
        records += ingest_file(file, fmt, model_id=model_id, device=device, engine=engine, threads=threads,
                              batch=batch, extra=extra)
    names = [latency_filename(record) for record in records]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise QatError("files", f"two measurements would both be written as {twice[0]}",
                       "ingest one file per model, device, engine, threads and batch (or give distinct --device)")
    return [write_latency_record(record, out) for record in records]
