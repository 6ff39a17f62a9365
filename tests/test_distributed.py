"""DDP through torchrun with 2 CPU processes (gloo): same weights as one process; the app writes one record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSIFICATION, TINY_DETECTION, overrides

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "QAT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("QAT_DEBUG", None)
    return env


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    single = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "single.pt")], cwd=tmp_path,
                            env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = _torchrun([str(WORKER), str(tmp_path / "ddp.pt")], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    assert a.keys() == b.keys()
    for key in a:  # same global batches, gradients averaged over ranks: equal up to float summation order
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    assert not torch.equal(a["0.weight"], torch.zeros_like(a["0.weight"]))


def _update_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest relative difference between two runs' weight updates (trained - calibrated), over the conv
    weights of the core."""
    gaps = []
    for key in (k for k in a["trained"] if k.endswith("conv.weight")):
        update_a = a["trained"][key] - a["calibrated"][key]
        update_b = b["trained"][key] - b["calibrated"][key]
        gaps.append(float((update_a - update_b).norm() / update_a.norm().clamp(min=1e-12)))
    return max(gaps)


@pytest.mark.slow
def test_detection_qat_on_two_processes_matches_one_process(tmp_path: Path) -> None:
    """Issue 17: SSDLite's QAT step on 2 ranks of 8 images gives one process's weights on the global batch of
    16, because the SSD loss divides by the matched boxes of the whole global batch. With each rank's own count
    (torchvision's references) the ranks' images are weighted unequally and the updates differ by tens of
    percent."""
    from qat.detection.synthetic import make_synthetic_coco

    root = make_synthetic_coco(tmp_path / "data", train_images=16, val_images=1, image_size=64, num_categories=3)
    worker = [str(WORKER), "--detection", str(root)]
    single = subprocess.run([sys.executable, *worker, str(tmp_path / "single.pt")], cwd=tmp_path,
                            env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    for name, extra in (("ddp", []), ("per_rank", ["--per-rank-n"])):
        ddp = _torchrun([*worker, str(tmp_path / f"{name}.pt"), *extra], tmp_path)
        assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b, control = (torch.load(tmp_path / f"{n}.pt") for n in ("single", "ddp", "per_rank"))
    assert a["trained"].keys() == b["trained"].keys()
    # one global step: the ranks' batch-of-8 kernels round differently from one batch of 16 (about 1e-6), which
    # swaps hard negatives at the mining cut-off of an untrained detector; measured 6e-3 (AMD EPYC, AVX-512) and
    # 1.2e-3 (two steps, another host) against 0.35 for the control; a second step amplified the swaps to 0.96
    assert _update_gap(a, b) < 0.05 < 0.2 < _update_gap(a, control)


@pytest.mark.slow
@pytest.mark.parametrize("bn_fold", [None, pytest.param("whitepaper", marks=pytest.mark.full),
                                     pytest.param("unfolded", marks=pytest.mark.full)])
def test_app_under_torchrun_writes_one_record(bn_fold: str | None, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # the default recipe at 16 images per process (issue 21): EMA activation ranges, combined across the ranks at
    # every step (qat.quant.range_sync), batch norm folded with the float model's running statistics from the first
    # step. With batch statistics instead (schedule.bn_freeze_step=null) this diverged within 3 QAT steps.
    fold = [f"quant.bn_fold={bn_fold}"] if bn_fold else []  # None: the preset's own (whitepaper §3.2.2)
    result = _torchrun([str(ROOT / "experiments" / "run.py"), *overrides(TINY_CLASSIFICATION), "quant=w8a8", *fold,
                        f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["quant"]["precision"] == "int8" and record["accuracy"]["int_top1"] >= 0
    assert record["fidelity"]["sim_vs_int_top1_agreement"] >= 90.0
    assert "[ddp] rank 0/2" in result.stderr + result.stdout
    assert record["quant"]["bn_fold"] == (bn_fold or "whitepaper")


DETECT_TINY = overrides(TINY_DETECTION, {"data.batch_size": 4, "data.eval_batch_size": 8,
                                         "data.synthetic.train_images": 16, "data.synthetic.val_images": 8,
                                         "train.float_epochs": 1})


@pytest.mark.slow
@pytest.mark.full  # detection under DDP in make test: test_detection_qat_on_two_processes_matches_one_process
def test_detection_under_torchrun_trains_on_both_ranks_and_writes_one_record(tmp_path: Path) -> None:
    """One training engine (issue 17): detection gets DDP like classification; each rank trains its shard of the
    seeded permutation, rank 0 alone evaluates, converts and writes the record."""
    run_dir = tmp_path / "run"
    result = _torchrun([str(ROOT / "experiments" / "detect.py"), *DETECT_TINY, "quant=w8a8",
                        f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = result.stderr + result.stdout
    assert "[ddp] rank 0/2" in logs and "[ddp] rank 1/2" in logs
    record = json.loads((run_dir / "record.json").read_text())
    assert record["training"]["world_size"] == 2 and record["task"] == "detection"
    assert 0.0 <= record["accuracy"]["int_map"] <= 100.0 and (run_dir / "int_model.pt").exists()
    assert sorted(p.name for p in run_dir.glob("record*.json")) == ["record.json"]
