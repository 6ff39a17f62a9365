"""Benchmark: batch-1 latency of float and int8 per engine (issue 5), and the harness's own overhead.

MobileNet v2 1.0 and ResNet-18 at 224x224, batch 1, 1 and 2 threads. Models have random weights, BN statistics
from a few random batches, and are prepared, calibrated on random batches and converted to the integer model
(no download). Every number is the median of one fresh subprocess (qat.latency.subprocess: threads fixed, CPU
affinity pinned). ONNX and ExecuTorch programs are compiled once per model and precision (qat.export formats)
and loaded by each thread setting's subprocess. Prints the table of medians, the int8 speed-up per engine
(engine's own float / its int8; torch_native_* against torch_eager), the best int8 against PyTorch eager float
(goals: >= 3x MobileNet v2, >= 2x ResNet-18), and the harness overhead against a bare timing loop (target <= 2%).

    .venv/bin/python scripts/bench/engines.py --repeats 30 --min-time-s 1 --json results/bench/engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from qat.engines.registry import ENGINES, build_int, is_installed
from qat.errors import QatError
from qat.latency.harness import measure
from qat.latency.host import describe_host
from qat.latency.random_models import random_float_model, random_int_model
from qat.latency.subprocess import ENGINE_FILES, MeasureSpec, measure_in_subprocess
from qat.records import atomic_write_bytes

MODELS = ("mobilenet_v2", "resnet18")
GOALS = {"mobilenet_v2": 3.0, "resnet18": 2.0}
FLOAT_ENGINES = ("torch_eager", "onnxruntime", "executorch_xnnpack")
INT_ENGINES = ("torch_native_x86", "torch_native_fbgemm", "torch_native_qnnpack", "onnxruntime",
               "executorch_xnnpack")


def compile_files(engine: str, float_model: torch.nn.Module, int_model: Any, resolution: int,
                  folder: Path) -> dict[str, str]:
    """Compile ``engine``'s float and int8 programs once (the qat.export formats); precision -> file."""
    from qat.export.bundle import FORMATS

    fmt = FORMATS[engine]
    example = torch.zeros(1, 3, resolution, resolution)
    files = {}
    for precision, data in (("float", lambda: fmt.float_bytes(float_model, example)),
                            ("int8", lambda: fmt.int_bytes(int_model))):
        path = folder / f"{engine}-{precision}{fmt.SUFFIX}"
        atomic_write_bytes(path, data())
        files[precision] = str(path)
    return files


def harness_overhead(int_model: Any, engine: str, resolution: int, rounds: int, repeats: int) -> dict[str, float]:
    """Median of ``measure()`` vs median of a bare ``perf_counter`` loop, interleaved, same process and engine."""
    torch.set_num_threads(1)
    fn = build_int(engine, int_model, 1)
    x = torch.randn(1, 3, resolution, resolution)
    bare, harness = [], []
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        for _ in range(rounds):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t0)
            bare.append(statistics.median(times) * 1e3)
            harness.append(measure(fn, x, threads=1, warmup=0, repeats=repeats).median_ms)
    b, h = statistics.median(bare), statistics.median(harness)
    return {"bare_ms": b, "harness_ms": h, "overhead": h / b - 1.0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    installed = {name for name in ENGINES if is_installed(name)}
    results: dict[str, Any] = {"host": describe_host(), "rows": [], "args": vars(args), "loadavg_before":
                               list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    with tempfile.TemporaryDirectory(prefix="qat-bench-engines-") as tmp:
        folder = Path(tmp)
        for arch in args.models:
            t0 = time.time()
            float_model = random_float_model(arch, resolution=args.resolution, seed=0)
            int_model = random_int_model(float_model, resolution=args.resolution)
            int_path = int_model.save(folder / f"{arch}-int_model.pt")
            weights = folder / f"{arch}-float.pt"
            torch.save(float_model.state_dict(), weights)
            files: dict[str, dict[str, str]] = {}
            for engine in ENGINE_FILES:
                if engine in installed:
                    try:
                        files[engine] = compile_files(engine, float_model, int_model, args.resolution, folder)
                    except QatError as exc:
                        print(f"  {arch} {engine}: cannot compile ({exc.one_line()})")
            print(f"[{arch}] models built and compiled in {time.time() - t0:.0f} s", flush=True)
            for threads in args.threads:
                for precision, engines in (("float", FLOAT_ENGINES), ("int8", INT_ENGINES)):
                    for engine in engines:
                        row = {"model": arch, "threads": threads, "precision": precision, "engine": engine}
                        if engine not in installed:
                            results["rows"].append({**row, "error": "not installed"})
                            continue
                        spec = MeasureSpec(engine=engine, precision=precision, int_model=str(int_path), arch=arch,
                                           weights=str(weights), resolution=args.resolution, threads=threads,
                                           warmup=args.warmup, repeats=args.repeats, min_time_s=args.min_time_s,
                                           engine_file=files.get(engine, {}).get(precision))
                        if engine in ENGINE_FILES and spec.engine_file is None:
                            results["rows"].append({**row, "error": "did not compile"})
                            continue
                        try:
                            out = measure_in_subprocess(spec, timeout_s=args.timeout_s)
                        except QatError as exc:
                            results["rows"].append({**row, "error": exc.one_line()})
                            print(f"  {arch} t{threads} {precision:5s} {engine:22s} unsupported: {exc.one_line()}")
                            continue
                        results["rows"].append({**row, **out["stats"], "child_threads": out["child"]["torch_threads"],
                                                "engine_threads": out["child"]["engine_threads"]})
                        print(f"  {arch} t{threads} {precision:5s} {engine:22s} {out['stats']['median_ms']:8.2f} ms",
                              flush=True)
            if arch == args.models[0] and args.overhead_engine in installed:
                results["overhead"] = {"model": arch, "engine": args.overhead_engine,
                                       **harness_overhead(int_model, args.overhead_engine, args.resolution,
                                                          args.overhead_rounds, args.repeats)}
    results["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return results


def median_of(rows: list[dict[str, Any]], **match: Any) -> float | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items()) and "median_ms" in r]
    return found[0]["median_ms"] if found else None


def table(results: dict[str, Any]) -> str:
    rows = results["rows"]
    lines = ["| model | threads | engine | float ms | int8 ms | int8 speed-up | vs eager float |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for arch in dict.fromkeys(r["model"] for r in rows):
        for threads in dict.fromkeys(r["threads"] for r in rows if r["model"] == arch):
            eager = median_of(rows, model=arch, threads=threads, precision="float", engine="torch_eager")
            best: tuple[float, str] | None = None
            for engine in dict.fromkeys(r["engine"] for r in rows):
                f = median_of(rows, model=arch, threads=threads, precision="float", engine=engine)
                i = median_of(rows, model=arch, threads=threads, precision="int8", engine=engine)
                if f is None and i is None:
                    continue
                base = f if f is not None else eager
                speedup = f"{base / i:.2f}x" if base and i else "-"
                if engine.startswith("torch_native"):
                    speedup += " (vs eager)"
                vs_eager = f"{eager / i:.2f}x" if eager and i else "-"
                lines.append(f"| {arch} | {threads} | {engine} | {f'{f:.2f}' if f else '-'} | "
                             f"{f'{i:.2f}' if i else '-'} | {speedup} | {vs_eager} |")
                if i is not None and (best is None or i < best[0]):
                    best = (i, engine)
            if best and eager:
                goal = GOALS.get(arch)
                ratio = eager / best[0]
                verdict = "" if goal is None else (" (goal {:.0f}x: {})".format(goal, "met" if ratio >= goal
                                                                                   else "NOT met"))
                summary.append(f"{arch}, {threads} thread(s): fastest int8 engine {best[1]} {best[0]:.2f} ms = "
                               f"{ratio:.2f}x faster than PyTorch eager float {eager:.2f} ms{verdict}")
    errors = [f"{r['model']} t{r['threads']} {r['precision']} {r['engine']}: {r['error']}"
              for r in rows if "error" in r]
    text = "\n".join(lines + [""] + summary)
    if errors:
        text += "\nnot measured:\n  " + "\n  ".join(errors)
    if "overhead" in results:
        o = results["overhead"]
        text += (f"\nharness overhead ({o['model']} int8 on {o['engine']}, 1 thread): measure() median "
                 f"{o['harness_ms']:.3f} ms vs bare loop {o['bare_ms']:.3f} ms = {100 * o['overhead']:+.2f}% "
                 f"(target <= 2%)")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--min-time-s", type=float, default=0.0)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--overhead-engine", default="onnxruntime")
    parser.add_argument("--overhead-rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the raw results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(args.threads))
    results = run(args)
    host = results["host"]
    print(f"\nhost: {host['cpu']} ({', '.join(host['cpu_flags'])}), {host['usable_cores']} usable cores, "
          f"{host['os']}, torch {host['torch']}; load average (1/5/15 min) before {results['loadavg_before']}, "
          f"after {results['loadavg_after']} (other processes share these cores: 2-thread rows suffer most)")
    print(table(results))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(results, indent=1, default=str) + "\n").encode())


if __name__ == "__main__":
    main()
