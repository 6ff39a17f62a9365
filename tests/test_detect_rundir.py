"""Detection run directories are unique per run, like classification's (configs/detect.yaml, ``${qat_unique:}``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _cli import register_detect_schemas  # noqa: E402


def compose_detect(overrides: list[str]):  # type: ignore[no-untyped-def]
    register_detect_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="detect", overrides=overrides, return_hydra_config=True)


def test_detection_run_and_sweep_dirs_differ_for_configs_composed_in_the_same_second() -> None:
    for _ in range(3):  # retry in the rare case the clock's second changes between the two compositions
        a, b = compose_detect([]), compose_detect([])
        dirs_a = (OmegaConf.select(a, "hydra.run.dir"), OmegaConf.select(a, "hydra.sweep.dir"))
        dirs_b = (OmegaConf.select(b, "hydra.run.dir"), OmegaConf.select(b, "hydra.sweep.dir"))
        same_second = dirs_a[0].rsplit("-", 1)[0] == dirs_b[0].rsplit("-", 1)[0]
        if same_second:
            break
    assert same_second
    assert dirs_a[0] != dirs_b[0] and dirs_a[1] != dirs_b[1]
    assert dirs_a[0].rsplit("-", 1)[0].endswith("-detect")  # <time>-<tag>-<token>
    assert dirs_a[0].rsplit("-", 1)[1] == dirs_a[1].rsplit("-", 1)[1]  # one token per composed config
    assert dirs_a[0] == OmegaConf.select(a, "hydra.run.dir")  # resolved once: a run keeps its directory


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
