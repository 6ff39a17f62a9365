"""Latency harness statistics and host description (no timing is asserted)."""

from __future__ import annotations

import pytest
import torch

from qat.errors import QatError
from qat.latency.harness import measure, summarize
from qat.latency.host import describe_host


def test_summary_statistics_are_exact() -> None:
    stats = summarize([0.001 * v for v in (5, 1, 3, 2, 4)], warmup=2, threads=1, batch=1)
    assert stats.median_ms == pytest.approx(3.0)
    assert stats.p10_ms == pytest.approx(1.4)
    assert stats.p90_ms == pytest.approx(4.6)
    assert stats.mean_ms == pytest.approx(3.0)
    assert stats.std_ms == pytest.approx(2**0.5)
    assert stats.n == 5


def test_measure_runs_warmup_and_repeats_and_restores_threads() -> None:
    calls = []
    before = torch.get_num_threads()
    stats = measure(lambda x: calls.append(torch.get_num_threads()), torch.zeros(3, 1), threads=1, warmup=4,
                    repeats=7)
    assert len(calls) == 11 and set(calls) == {1}
    assert stats.n == 7 and stats.batch == 3 and stats.warmup == 4
    assert torch.get_num_threads() == before


def test_measure_respects_a_time_budget() -> None:
    stats = measure(lambda x: x + 1, torch.zeros(1), warmup=0, repeats=1, min_time_s=0.05)
    assert stats.n > 1


def test_bad_thread_count_is_a_clear_error() -> None:
    with pytest.raises(QatError, match="latency.threads"):
        measure(lambda x: x, torch.zeros(1), threads=0)


def test_host_description_names_cpu_and_versions() -> None:
    host = describe_host()
    assert host["cores"] >= 1 and host["cpu"] and host["torch"] == torch.__version__
