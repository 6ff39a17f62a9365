"""Kills and damaged checkpoints (issue 10 item 1).

Checkpoint files carry a sha256 of their payload; the previous good one is kept beside the last; a truncated or
bit-flipped last checkpoint is reported in one log line and the previous one used. A training run (the Hydra
app on tiny demo data, CPU, one thread) killed with SIGKILL at seeded random moments and re-run each time in the
same run directory ends with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSIFICATION, TINY_DETECTION, overrides

from qat.errors import QatError
from qat.train.checkpoint import (
    CheckpointDamaged,
    load_checkpoint,
    previous_path,
    read_checkpoint_file,
    resume_state,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((64,), value), "b": torch.arange(8.0)}, "epoch": int(value), "step": 3}


def test_previous_path_names() -> None:
    assert previous_path("/r/checkpoints/float_last.pt") == Path("/r/checkpoints/float_prev.pt")
    assert previous_path("/c/float/abc.pt") == Path("/c/float/abc.prev.pt")


def test_save_keeps_the_previous_good_checkpoint(tmp_path: Path) -> None:
    last = tmp_path / "qat_last.pt"
    save_checkpoint(last, _state(1.0))
    assert not previous_path(last).exists()
    save_checkpoint(last, _state(2.0))
    save_checkpoint(last, _state(3.0))
    assert read_checkpoint_file(last)["epoch"] == 3
    assert read_checkpoint_file(previous_path(last))["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat_last.pt", "qat_prev.pt"]  # no temporary left


@pytest.mark.parametrize("damage", ["truncate_payload", "truncate_header", "empty", "garbage"])
def test_truncated_last_checkpoint_falls_back_to_previous(damage: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    last = tmp_path / "float_last.pt"
    save_checkpoint(last, _state(1.0))
    save_checkpoint(last, _state(2.0))
    data = last.read_bytes()
    last.write_bytes({"truncate_payload": data[: len(data) * 2 // 3], "truncate_header": data[:40], "empty": b"",
                      "garbage": os.urandom(len(data))}[damage])
    with pytest.raises(CheckpointDamaged) as info:
        read_checkpoint_file(last)
    assert str(last) in info.value.one_line()
    with caplog.at_level(logging.WARNING, logger="qat"):
        state, source = resume_state(last)
    assert source == previous_path(last) and state["epoch"] == 1
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and str(last) in lines[0] and str(previous_path(last)) in lines[0]
    assert load_checkpoint(last)["epoch"] == 1


def test_every_single_bit_flip_sampled_is_detected(tmp_path: Path) -> None:
    """A flipped bit anywhere (header or payload; 200 seeded positions) fails the checksum; the previous good
    checkpoint is used."""
    last = tmp_path / "float_last.pt"
    save_checkpoint(last, _state(1.0))
    save_checkpoint(last, _state(2.0))
    good = last.read_bytes()
    rng = random.Random(0)
    positions = [0, 9, 40, len(good) - 1, *(rng.randrange(len(good)) for _ in range(196))]
    for position in positions:
        flipped = bytearray(good)
        flipped[position] ^= 1 << rng.randrange(8)
        last.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointDamaged):
            read_checkpoint_file(last)
        state, source = resume_state(last)
        assert source.name == "float_prev.pt" and state["epoch"] == 1, position


def test_both_damaged_is_one_error_naming_both(tmp_path: Path) -> None:
    last = tmp_path / "qat_last.pt"
    save_checkpoint(last, _state(1.0))
    save_checkpoint(last, _state(2.0))
    for path in (last, previous_path(last)):
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(QatError) as info:
        resume_state(last)
    line = info.value.one_line()
    assert "\n" not in line and str(last) in line and str(previous_path(last)) in line and "delete" in line


def test_missing_last_uses_previous_and_nothing_is_none(tmp_path: Path) -> None:
    last = tmp_path / "qat_last.pt"
    assert resume_state(last) is None
    with pytest.raises(QatError, match="does not exist"):
        load_checkpoint(last)
    save_checkpoint(last, _state(1.0))
    save_checkpoint(last, _state(2.0))
    last.unlink()
    assert resume_state(last)[0]["epoch"] == 1


def test_checkpoint_written_before_checksums_still_loads(tmp_path: Path) -> None:
    legacy = tmp_path / "old.pt"
    torch.save(_state(5.0), legacy)
    assert read_checkpoint_file(legacy)["epoch"] == 5


# --- the Hydra app killed at random moments ------------------------------------------------------------------

KILLABLE = {"quant": "w8a8", "train.cache_float": False, "train.checkpoint_every_steps": 1, "logger": "csv"}
# (app, overrides, float steps, QAT steps): 2 float epochs and 1 QAT epoch of 6 batches each
APPS = {"classification": ("run.py", overrides(TINY_CLASSIFICATION, KILLABLE), 2 * 6, 6),
        "detection": ("detect.py", overrides(TINY_DETECTION, KILLABLE), 2 * 6, 6)}


def _command(run_dir: Path, app: str = "classification") -> list[str]:
    script, overrides, _, _ = APPS[app]
    return [sys.executable, str(ROOT / "experiments" / script), *overrides, f"hydra.run.dir={run_dir}"]


def _env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "QAT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("QAT_DEBUG", None)
    return env


def _progress(metrics: Path, float_steps: int) -> int:
    """Training steps done so far, counted over both phases, from the ``loss`` rows of metrics.csv."""
    if not metrics.exists():
        return 0
    with metrics.open(encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if len(row) == 5 and row[3] == "loss"]
    return max((int(step) + 1 + (float_steps if phase == "qat" else 0) for _, phase, step, _, _ in rows), default=0)


def _has_checkpoint(run_dir: Path) -> bool:
    """A float-phase checkpoint (last or previous) exists, so a start must resume rather than begin anew."""
    last = run_dir / "checkpoints" / "float_last.pt"
    return last.exists() or previous_path(last).exists()


def _without_timings(value: object) -> object:
    """``value`` with every wall-clock field (``*_s``) removed, at any depth."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not k.endswith("_s")}
    return value


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(path)["model"].items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
@pytest.mark.full  # 76 s on 2 cores; make test resumes a killed run once (test_run_app's killed-run test)
@pytest.mark.parametrize("app", ["classification", "detection"])
def test_sigkill_at_random_moments_then_rerun_gives_the_uninterrupted_result(app: str, tmp_path: Path) -> None:
    """Both tasks' apps (one pipeline, one training engine): killed at seeded moments, re-run to the end."""
    torch.set_num_threads(1)
    _, _, float_steps, qat_steps = APPS[app]
    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    done = subprocess.run(_command(reference, app), cwd=tmp_path, env=_env(cache), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = json.loads((reference / "record.json").read_text())

    run_dir = tmp_path / "killed"
    metrics = run_dir / "metrics.csv"
    rng = random.Random(2024)
    # kill i comes a random instant (0-0.4 s) after the run passed a random step: mid-step, mid-checkpoint-write,
    # at start-up (when the previous delay overshot the next step) or after the last step (evaluation, conversion)
    targets = sorted(rng.sample(range(1, float_steps + qat_steps + 1), 5))
    outputs, had_checkpoint = [], []
    for target in targets:
        delay = rng.uniform(0.0, 0.4)
        had_checkpoint.append(_has_checkpoint(run_dir))
        proc = subprocess.Popen(_command(run_dir, app), cwd=tmp_path, env=_env(cache), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None and _progress(metrics, float_steps) < target:
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before its kill; give it more steps"
        proc.send_signal(signal.SIGKILL)
        outputs.append(proc.communicate(timeout=60)[0])
        assert proc.returncode == -signal.SIGKILL
        assert not (run_dir / "record.json").exists()
    had_checkpoint.append(_has_checkpoint(run_dir))
    final = subprocess.run(_command(run_dir, app), cwd=tmp_path, env=_env(cache), capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    outputs.append(final.stdout + final.stderr)
    # a start that found a checkpoint and got as far as training resumed it (a kill during start-up may come
    # before any training line: such a start says nothing); the final start always gets there
    for output, resumable in zip(outputs, had_checkpoint, strict=True):
        training = [line for line in output.splitlines() if " - [float] " in line or " - [qat] " in line]
        if resumable and training:
            assert "resuming from" in training[0], training[0]
    assert had_checkpoint[-1] and "resuming from" in outputs[-1]
    resumes = [line for output in outputs for line in output.splitlines() if "resuming from" in line]
    assert any(", batch 0" not in line for line in resumes)  # mid-epoch

    record = json.loads((run_dir / "record.json").read_text())
    assert record["accuracy"] == expected["accuracy"]
    assert _without_timings(record["fidelity"]) == _without_timings(expected["fidelity"])
    ours, theirs = _model_tensors(run_dir / "checkpoints" / "qat_last.pt"), _model_tensors(
        reference / "checkpoints" / "qat_last.pt")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    for phase in ("float", "qat"):
        steps = float_steps if phase == "float" else qat_steps
        assert load_checkpoint(run_dir / "checkpoints" / f"{phase}_last.pt")["step"] == steps
