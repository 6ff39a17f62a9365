"""Detection run directories are unique per run, like classification's (configs/detect.yaml, ``${qat_unique:}``);
composing twice in the same second is tested with classification's in tests/test_tracking.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_detection_processes_with_the_same_time_stamp_get_different_dirs(tmp_path: Path) -> None:
    """The app itself registers the resolver: a fixed prefix stands for "the same second"."""
    cmd = [sys.executable, str(ROOT / "experiments" / "detect.py"), "model.backbone=vgg16",
           "hydra.run.dir=outputs/runs/2030-01-01/12-00-00-detect-${qat_unique:}"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err  # bad backbone: stops after Hydra made the run directory
        assert "model.backbone" in err
    dirs = sorted(p.name for p in (tmp_path / "outputs" / "runs" / "2030-01-01").iterdir())
    assert len(dirs) == 2 and all(d.startswith("12-00-00-detect-") for d in dirs)
