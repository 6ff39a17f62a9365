"""Sweep progress on the console (issue 15 item 2): after each job of a local sweep, one flushed line with the jobs
done, the time spent and the time left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CLASSIFICATION, overrides

from qat.sweep_progress import duration, sweep_size

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_size_is_the_product_of_the_sweeps() -> None:
    assert sweep_size(["experiment=demo", "quant=float,w8a8", "model.width_mult=0.35,0.5,1.0"]) == 6
    assert sweep_size(["seed=range(0,4)", "quant=w8a8"]) == 4
    assert sweep_size(["model.arch=resnet18"]) == 1
    assert sweep_size(["this is not an override ((("]) is None


def test_duration_reads_as_minutes_and_seconds() -> None:
    assert duration(5.4) == "5 s"
    assert duration(156) == "2 min 36 s"


@pytest.mark.slow
def test_local_sweep_prints_progress_after_each_job_through_a_pipe(tmp_path: Path) -> None:
    env = {**os.environ, "QAT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = overrides(TINY_CLASSIFICATION, {"quant": "float", "model.width_mult": "0.35,0.5", "train.float_epochs": 1})
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("[sweep] 1/2 jobs done in "))
    second_job = next(i for i, line in enumerate(lines) if "#1 : " in line)
    assert first < second_job and "left" in lines[first]  # printed at once, before the next job starts
    assert any(line.startswith("[sweep] 2/2 jobs done in ") and "left" not in line for line in lines)
