"""Timing harness: warm-up, fixed threads, repeats until a count and a time budget, percentile statistics."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from qat.errors import QatError


@dataclass
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    n: int
    warmup: int
    threads: int
    batch: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (q in [0, 100])."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize(times_s: list[float], *, warmup: int, threads: int, batch: int) -> LatencyStats:
    ms = sorted(t * 1e3 for t in times_s)
    return LatencyStats(median_ms=statistics.median(ms), p10_ms=_percentile(ms, 10), p90_ms=_percentile(ms, 90),
                        mean_ms=statistics.fmean(ms), std_ms=statistics.pstdev(ms) if len(ms) > 1 else 0.0,
                        n=len(ms), warmup=warmup, threads=threads, batch=batch)


def measure(fn: Callable[[torch.Tensor], object], example: torch.Tensor, *, threads: int = 1, warmup: int = 10,
            repeats: int = 50, min_time_s: float = 0.0) -> LatencyStats:
    """Time ``fn(example)``: ``warmup`` untimed calls, then at least ``repeats`` timed calls and at least
    ``min_time_s`` seconds, with ``torch.set_num_threads(threads)`` for the duration."""
    if threads < 1:
        raise QatError("latency.threads", f"{threads} is not a positive thread count", "use 1 or more")
    if repeats < 1 or warmup < 0:
        raise QatError("latency.repeats", f"repeats={repeats}, warmup={warmup}", "use repeats >= 1, warmup >= 0")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                fn(example)
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < repeats or time.perf_counter() - start < min_time_s:
                t0 = time.perf_counter()
                fn(example)
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return summarize(times, warmup=warmup, threads=threads, batch=int(example.shape[0]))
