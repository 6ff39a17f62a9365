"""Multiruns through hydra-submitit-launcher's local executor, with one job preempted and requeued
(classification: 4 jobs; detection: 2).

submitit's protocol: the job process gets USR2 before preemption or its time limit; submitit calls the task's
``checkpoint()`` (hydra-submitit-launcher resubmits the same job), the process exits with the requeue code and
the job starts again. The job resolves the same run directory, resumes from its last checkpoint, continues its
W&B run (id from the checkpoint) and ends with the weights and metrics of an uninterrupted twin.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSIFICATION, TINY_DETECTION, overrides

from qat.tracking.offline import summarize
from qat.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = overrides(TINY_CLASSIFICATION, {"latency.repeats": 20, "latency.warmup": 3, "train.cache_float": False,
                                        "logger.log_every": 1})
PREEMPTED = 3  # job 3 of quant={float,w8a8} x logger={csv,wandb}: w8a8 with W&B; job 2 is its csv twin


def job_pid(log_file: Path) -> int | None:
    """The submitit task process that has ``log_file`` (its Hydra job log) open."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"submitit.core._submit" not in (proc / "cmdline").read_bytes():
                continue
            if any(os.readlink(fd) == str(log_file) for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    return None


def preempt_when(log_file: Path, line: str, proc: subprocess.Popen[str], timeout_s: float = 300) -> None:
    """Send submitit's preemption signal to the job writing ``log_file`` once ``line`` appears in it."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if log_file.exists() and line in log_file.read_text():
            pid = job_pid(log_file)
            assert pid is not None, f"no submitit process holds {log_file}"
            os.kill(pid, signal.SIGUSR2)
            return
        time.sleep(0.2)
    raise AssertionError(f"{line!r} never appeared in {log_file}")


def state_dict(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "qat_last.pt")["model"]  # verifies the checksum header


@pytest.mark.slow
def test_submitit_local_multirun_with_a_preempted_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = {**os.environ, "QAT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "-m", *TINY, "launcher=submitit_local",
           "quant=float,w8a8", "logger=csv,wandb", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        preempt_when(sweep / str(PREEMPTED) / "run.log", "[float] epoch 1/2", proc)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]

    records = {job: json.loads((sweep / str(job) / "record.json").read_text()) for job in range(4)}
    assert [records[j]["quant"]["precision"] for j in range(4)] == ["float", "float", "int8", "int8"]
    assert len({records[j]["run_dir"] for j in range(4)}) == 4

    # the preempted job was requeued, resumed from its checkpoint and ended like its uninterrupted twin
    log = (sweep / str(PREEMPTED) / "run.log").read_text()
    assert "this job is preempted" in log and "Requeued job" in log and "[float] resuming from" in log
    twin = PREEMPTED - 1
    assert records[PREEMPTED]["accuracy"] == records[twin]["accuracy"]
    def without_timing(fidelity: dict) -> dict:  # build_s and eval_s per engine are wall-clock times
        return {**fidelity, "engines": {name: {k: v for k, v in e.items() if k not in ("build_s", "eval_s")}
                                        for name, e in fidelity["engines"].items()}}

    assert without_timing(records[PREEMPTED]["fidelity"]) == without_timing(records[twin]["fidelity"])
    a, b = state_dict(sweep / str(PREEMPTED)), state_dict(sweep / str(twin))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # W&B: both attempts of the preempted job are one W&B run (same id), the first marked preempting;
    # runs of the sweep share one group
    attempts = [summarize(p) for p in sorted((sweep / str(PREEMPTED)).glob("wandb/offline-run-*/run-*.wandb"))]
    assert len(attempts) == 2 and attempts[0]["id"] == attempts[1]["id"]
    assert attempts[0]["preempting"] and attempts[0]["exit_code"] == 1 and attempts[1]["exit_code"] == 0
    (float_wandb,) = [summarize(p) for p in (sweep / "1").glob("wandb/offline-run-*/run-*.wandb")]
    assert float_wandb["group"] == attempts[1]["group"] == "/".join(sweep.parts[-2:])
    final = attempts[1]
    assert final["summary"]["record"]["accuracy"] == records[PREEMPTED]["accuracy"]
    assert final["summary"]["top1/int"] == records[PREEMPTED]["accuracy"]["int_top1"]
    assert final["config"]["hydra_choices"]["launcher"] == "submitit_local"
    assert final["config"]["quant"]["precision"] == "int8"
    qat_rows = [row for row in final["history"] if "qat/loss" in row]
    assert [row["qat/step"] for row in qat_rows] == list(range(len(qat_rows))) and qat_rows

    # the csv twin logged every step of both phases and the top-1s
    rows = list(csv.DictReader((sweep / str(twin) / "metrics.csv").open()))
    steps = {phase: {int(r["step"]) for r in rows if r["phase"] == phase and r["key"] == "loss"}
             for phase in ("float", "qat")}
    assert steps["qat"] == set(range(len(qat_rows))) and len(steps["float"]) == 2 * len(qat_rows)
    assert {r["key"] for r in rows if r["phase"] == "eval"} == {f"top{k}{stage}" for k in (1, 5)
                                                               for stage in ("", "/float", "/sim", "/int")}


TINY_DETECT = overrides(TINY_DETECTION, {"quant": "w8a8", "train.cache_float": False, "logger.log_every": 1})


@pytest.mark.slow
@pytest.mark.full  # a preempted submitit job in make test: test_submitit_local_multirun_with_a_preempted_job
def test_submitit_local_detection_sweep_with_a_preempted_job(tmp_path: Path) -> None:
    """The detection app on the same launcher and tracker (issue 17): job 1 (W&B) is preempted during float
    training, requeued, resumes and continues its W&B run, and ends like its csv twin (job 0)."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "QAT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)
    cmd = [sys.executable, str(ROOT / "experiments" / "detect.py"), "-m", *TINY_DETECT, "launcher=submitit_local",
           "logger=csv,wandb", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        preempt_when(sweep / "1" / "detect.log", "[float] epoch 1/2", proc)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    records = {job: json.loads((sweep / str(job) / "record.json").read_text()) for job in range(2)}
    log = (sweep / "1" / "detect.log").read_text()
    assert "this job is preempted" in log and "Requeued job" in log and "[float] resuming from" in log
    assert records[1]["task"] == "detection" and records[1]["accuracy"] == records[0]["accuracy"]
    a, b = state_dict(sweep / "1"), state_dict(sweep / "0")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    attempts = [summarize(p) for p in sorted((sweep / "1").glob("wandb/offline-run-*/run-*.wandb"))]
    assert len(attempts) == 2 and attempts[0]["id"] == attempts[1]["id"] and attempts[0]["preempting"]
    final = attempts[1]
    assert final["summary"]["map/int"] == records[1]["accuracy"]["int_map"]
    assert final["config"]["hydra_choices"]["launcher"] == "submitit_local"
    assert [row["qat/step"] for row in final["history"] if "qat/loss" in row] == list(range(6))
