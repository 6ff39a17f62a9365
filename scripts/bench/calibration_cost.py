"""Benchmark: cost of MSE-optimal calibration (Choukroun et al. 2019) relative to min/max calibration.

Calibrates the same prepared model on the same batches with min/max ranges and with MSE-optimal ranges
(weights per channel, activations per tensor), interleaved, and prints the median time of one calibration
pass per observer and the ratio to min/max (target: MSE ≤ 3× min/max). Also prints the float forward pass
as the floor both are measured against.

    .venv/bin/python scripts/bench/calibration_cost.py --resolution 112 --batch 32 --batches 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from qat.quant.config import QuantConfig
from qat.quant.prepare import calibration_mode, prepare

OBSERVERS = {"min/max": ("minmax", "current"), "mse": ("mse", "mse")}


def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """One calibration pass over ``batches``; return its wall time in seconds."""
    t0 = time.perf_counter()
    with calibration_mode(model), torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - t0


def float_pass(model: nn.Module, batches: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [torch.randn(args.batch, 3, args.resolution, args.resolution) for _ in range(args.batches)]
    print(f"{args.batches} batches of {args.batch} at {args.resolution}x{args.resolution}, {args.threads} thread(s), "
          f"w8a8 per-channel; median of {args.repeats} interleaved passes")
    print(f"{'model':<14}{'calibration':<14}{'s/pass':>9}{'ratio':>8}")
    for name in ("mobilenet_v2", "resnet18"):
        model = getattr(torchvision.models, name)(num_classes=10).eval()
        prepared = {label: prepare(model, QuantConfig(act_observer=act, weight_observer=weight), batches[0][:1])
                    for label, (act, weight) in OBSERVERS.items()}
        times: dict[str, list[float]] = {"float forward": [], **{label: [] for label in prepared}}
        for m in prepared.values():  # warm-up
            calibrate(m, batches[:1])
        for _ in range(args.repeats):
            times["float forward"].append(float_pass(model, batches))
            for label, m in prepared.items():
                times[label].append(calibrate(m, batches))
        base = statistics.median(times["min/max"])
        for label, values in times.items():
            med = statistics.median(values)
            print(f"{name:<14}{label:<14}{med:>9.3f}{med / base:>8.2f}")


if __name__ == "__main__":
    main()
