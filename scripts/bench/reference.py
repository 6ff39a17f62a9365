"""Benchmark: images per second of the integer-only reference executor against the float model's evaluation and
torch_native int8 (issue 22, item 5: fidelity at dataset scale).

MobileNet v2 1.0 and ResNet-18 at 224x224, batch 64, random seeded weights, BN statistics from random batches;
the integer model comes from the project's path: ``build_model``, ``prepare`` with a QuantConfig, calibration on
random batches (``calibration_mode``), ``convert`` (qat.latency.random_models). Per model and device, the three
run on the same batches, interleaved, after one warm-up batch each; throughput is the batch size over the
median time per batch, and the ratios are measured in this run. CPU always; CUDA too when
``torch.cuda.is_available()`` (the float model and the reference; torch_native int8 has CPU kernels only). The
last lines are
``reference/float eval time: <r> (<model>, <device>)``, one per model and device (goal: <= 3).

    .venv/bin/python scripts/bench/reference.py --batch 16 --batches 2 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from qat.engines.registry import build_int
from qat.intmodel.reference import build
from qat.latency.host import describe_host
from qat.latency.random_models import random_float_model, random_int_model
from qat.quant.config import QuantConfig

MODELS = ("mobilenet_v2", "resnet18")
GOAL = 3.0  # reference time / float evaluation time, issue 22
Runner = Callable[[torch.Tensor], torch.Tensor]


def timed(fn: Runner, x: torch.Tensor) -> float:
    """Seconds of one call, synchronised on CUDA."""
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(runners: dict[str, Runner], batches: list[torch.Tensor]) -> dict[str, float]:
    """Median seconds per batch of each runner (one warm-up call each first, then interleaved per batch: the
    median resists other processes on shared cores)."""
    with torch.inference_mode():
        for fn in runners.values():
            fn(batches[0])
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        for x in batches:
            for name, fn in runners.items():
                seconds[name].append(timed(fn, x))
    return {name: statistics.median(times) for name, times in seconds.items()}


def runners_for(arch: str, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Runner], str]:
    """Float eval, reference and (CPU) int8 engine of one model on ``device``; and the reference's plan summary."""
    float_model = random_float_model(arch, resolution=args.resolution, seed=0)
    int_model = random_int_model(float_model, resolution=args.resolution, config=QuantConfig(act_observer="minmax"))
    reference = build(int_model, device=device)  # its constants on the device of the batches
    plans: dict[str, int] = {}
    for plan in getattr(reference, "plans", {}).values():  # absent before issue 22 (int64 GEMMs)
        plans[plan.describe()] = plans.get(plan.describe(), 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in plans.items()) or "int64"
    float_model = float_model.to(device).eval()
    runners: dict[str, Runner] = {"float eval": float_model, "reference": reference}
    if device.type == "cpu" and args.int8_engine != "none":
        runners[f"{args.int8_engine} int8"] = build_int(args.int8_engine, int_model, args.threads)
    return runners, summary


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() and args.cuda else [])
    rows = []
    for arch in args.models:
        for device in devices:
            t0 = time.time()
            runners, summary = runners_for(arch, args, device)
            generator = torch.Generator().manual_seed(1)
            batches = [torch.randn(args.batch, 3, args.resolution, args.resolution, generator=generator).to(device)
                       for _ in range(args.batches)]
            built = time.time() - t0
            seconds = throughput(runners, batches)
            row = {"model": arch, "device": device.type, "images": args.batch, "seconds": seconds, "plans": summary}
            rows.append(row)
            print(f"[{arch} {device.type}] built in {built:.0f} s; reference conv/linear kernels: {summary}",
                  flush=True)
            for name, s in seconds.items():
                print(f"  {name:24s} {args.batch / s:9.2f} images/s  (median {s:.3f} s per batch of {args.batch})")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="timed batches per model (after one warm-up)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    parser.add_argument("--int8-engine", default="torch_native_x86", help="an int8 engine name, or none")
    parser.add_argument("--no-cuda", dest="cuda", action="store_false", help="CPU only even with a GPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    host = describe_host()
    print(f"host: {host['cpu']} ({', '.join(host['cpu_flags'])}), {host['usable_cores']} usable cores, "
          f"{args.threads} threads, {host['os']}, torch {host['torch']}"
          + (f", CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() and args.cuda else "")
          + f"; load average before {list(os.getloadavg()) if hasattr(os, 'getloadavg') else None}")
    print(f"settings: resolution {args.resolution}, batch {args.batch}, {args.batches} timed batches per model")
    rows = run(args)
    print(f"load average after {list(os.getloadavg()) if hasattr(os, 'getloadavg') else None}")
    for row in rows:
        s = row["seconds"]
        others = ", ".join(f"{name}/float eval {s[name] / s['float eval']:.2f}" for name in s
                           if name not in ("float eval", "reference"))
        print(f"{row['model']} {row['device']}: reference {row['images'] / s['reference']:.2f} images/s, float eval "
              f"{row['images'] / s['float eval']:.2f} images/s" + (f"; {others}" if others else ""))
    for row in rows:
        s = row["seconds"]
        ratio = s["reference"] / s["float eval"]
        print(f"reference/float eval time: {ratio:.2f} ({row['model']}, {row['device']}, goal <= {GOAL:g}: "
              f"{'met' if ratio <= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
