"""Loggers (none, csv, W&B offline), the W&B run id kept in checkpoints, unique run directories, collect."""

from __future__ import annotations

import csv
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qat.errors import QatError
from qat.records import write_record
from qat.schema import LoggerConfig
from qat.tracking import RUN_ID_KEY, RunLogger, build_logger, find_run_id, open_logger
from qat.tracking.csv_logger import CsvLogger
from qat.tracking.offline import summarize
from qat.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from _cli import register_detect_schemas, register_schemas  # noqa: E402
from collect import collect  # noqa: E402


def wandb_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def open_wandb(run_dir: Path, **overrides: object):  # type: ignore[no-untyped-def]
    cfg = LoggerConfig(name="wandb", mode="offline", tags=["t1"], **overrides)  # type: ignore[arg-type]
    return open_logger(cfg, run_dir, config={"model": {"arch": "mobilenet_v2"}, "seed": 3}, group="sweep-a",
                       run_name="job-0")


def test_wandb_offline_run_holds_config_metrics_and_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    record = {"accuracy": {"top1": 61.5}, "model_id": "m"}
    with open_wandb(run_dir) as tracker:
        for step in range(4):
            tracker.log_step("float", step, {"loss": 2.0 - step / 4, "lr": 0.1, "epoch": (step + 1) / 4})
        tracker.log_metrics({"top1/float": 61.5})
        tracker.log_record(record)
        run_id = tracker.run_id
    (path,) = wandb_files(run_dir)
    run = summarize(path)
    assert run["id"] == run_id and run["group"] == "sweep-a" and run["project"] == "qat"
    assert run["config"]["model"] == {"arch": "mobilenet_v2"} and run["config"]["seed"] == 3
    losses = [row["float/loss"] for row in run["history"] if "float/loss" in row]
    assert losses == [2.0, 1.75, 1.5, 1.25]
    assert [row["float/step"] for row in run["history"] if "float/loss" in row] == [0, 1, 2, 3]
    assert run["summary"]["top1/float"] == 61.5 and run["summary"]["record"] == record
    assert run["exit_code"] == 0


def test_failed_run_finishes_with_exit_code_1_and_resume_keeps_the_id(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError), open_wandb(run_dir) as tracker:
        save_checkpoint(run_dir / "checkpoints" / "float_last.pt", {"epoch": 1, RUN_ID_KEY: tracker.run_id})
        first_id = tracker.run_id
        raise RuntimeError("boom")
    assert find_run_id(run_dir) == first_id
    with open_wandb(run_dir) as tracker:  # the requeued run: same W&B id, read from the checkpoint
        assert tracker.run_id == first_id
    runs = [summarize(p) for p in wandb_files(run_dir)]
    assert [r["id"] for r in runs] == [first_id, first_id]
    assert sorted(r["exit_code"] for r in runs) == [0, 1]


def test_interrupted_run_is_marked_preempting(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit), open_wandb(run_dir):
        sys.exit(144)  # what submitit's requeue does inside the job
    (path,) = wandb_files(run_dir)
    run = summarize(path)
    assert run["preempting"] and run["exit_code"] == 1


def test_csv_logger_writes_tidy_rows_and_honours_log_every(tmp_path: Path) -> None:
    with open_logger(LoggerConfig(name="csv", log_every=2), tmp_path, config={}, group=None,
                     run_name=None) as tracker:
        assert isinstance(tracker, CsvLogger) and tracker.run_id is None
        for step in range(5):
            tracker.log_step("qat", step, {"loss": 1.0, "lr": 0.01})
        tracker.log_metrics({"top1/int": 70.25})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert {r["step"] for r in rows if r["phase"] == "qat"} == {"0", "2", "4"}
    assert {r["key"] for r in rows if r["phase"] == "qat"} == {"loss", "lr"}
    assert [(r["key"], float(r["value"])) for r in rows if r["phase"] == "eval"] == [("top1/int", 70.25)]
    assert [(r["key"], r["value"]) for r in rows if r["phase"] == "run"] == [("failed", "0.0")]


def test_none_logger_and_unknown_names() -> None:
    assert type(build_logger(LoggerConfig(), ".", config={}, group=None, run_name=None)) is RunLogger
    with pytest.raises(QatError, match=r"^logger.name: unknown value 'tensorboard'"):
        build_logger(LoggerConfig(name="tensorboard"), ".", config={}, group=None, run_name=None)
    with pytest.raises(QatError, match=r"^logger.mode: unknown value 'offlne'"):
        build_logger(LoggerConfig(name="wandb", mode="offlne"), ".", config={}, group=None, run_name=None)


def compose_run(overrides: list[str], config_name: str = "run"):  # type: ignore[no-untyped-def]
    (register_detect_schemas if config_name == "detect" else register_schemas)()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(("config_name", "tag"), [("run", "default"), ("detect", "detect")])
def test_run_and_sweep_dirs_differ_for_configs_composed_in_the_same_second(
        config_name: str, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import hydra.core.utils

    class SameSecond(datetime.datetime):
        """Hydra's ``${now:}`` resolver reads ``hydra.core.utils.datetime.now()``: one frozen second for both
        compositions (timing them to land in one second failed on a loaded 2-core host)."""

        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
            return cls(2030, 1, 1, 12, 0, 0)

    monkeypatch.setattr(hydra.core.utils, "datetime", SameSecond)
    a, b = compose_run([], config_name), compose_run([], config_name)
    dirs_a = (OmegaConf.select(a, "hydra.run.dir"), OmegaConf.select(a, "hydra.sweep.dir"))
    dirs_b = (OmegaConf.select(b, "hydra.run.dir"), OmegaConf.select(b, "hydra.sweep.dir"))
    assert dirs_a[0].rsplit("-", 1)[0] == dirs_b[0].rsplit("-", 1)[0] == f"outputs/runs/2030-01-01/12-00-00-{tag}"
    assert dirs_a[0] != dirs_b[0] and dirs_a[1] != dirs_b[1]
    assert dirs_a[0].rsplit("-", 1)[0].endswith(f"-{tag}")  # <time>-<tag>-<token>
    assert dirs_a[0].rsplit("-", 1)[1] == dirs_a[1].rsplit("-", 1)[1]  # one token per composed config
    assert dirs_a[0] == OmegaConf.select(a, "hydra.run.dir")  # resolved once: a run keeps its directory


@pytest.mark.slow
def test_two_processes_started_with_the_same_time_stamp_get_different_dirs(tmp_path: Path) -> None:
    """The same fixed prefix stands for "the same second": only the ${qat_unique:} token tells them apart."""
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "model.arch=resnet9000",
           "hydra.run.dir=outputs/runs/2030-01-01/12-00-00-demo-${qat_unique:}"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 2  # bad model name: stops after Hydra made the run directory
    dirs = sorted(p.name for p in (tmp_path / "outputs" / "runs" / "2030-01-01").iterdir())
    assert len(dirs) == 2 and all(d.startswith("12-00-00-demo-") for d in dirs)


def test_launcher_presets_compose() -> None:
    slurm = compose_run(["launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4"])
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == 4 and launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    local = compose_run(["launcher=submitit_local"]).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher")
    assert compose_run([]).hydra.launcher._target_.endswith("BasicLauncher")
    wandb = compose_run(["logger=wandb"])
    assert wandb.logger.name == "wandb" and wandb.logger.mode in ("offline", "online", "disabled")


def record(model_id: str, top1: float, overrides: list[dict[str, object]]) -> dict[str, object]:
    return {"model_id": model_id, "quant": {"precision": "int8", "overrides": overrides},
            "model": {"arch": "resnet18", "width_mult": 1.0}, "accuracy": {"top1": top1}}


def test_collect_writes_one_tidy_table_and_lists_bad_records(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write_record(runs / "a" / "0", record("m-a", 70.0, []))
    write_record(runs / "b" / "1", record("m-b", 71.5, [{"pattern": "fc", "keep_float": True}]))
    (runs / "c").mkdir()
    (runs / "c" / "record.json").write_text('{"schema": "qat.record/1", "model_id": ')  # truncated
    table, written, skipped = collect(runs, tmp_path / "out")
    assert [p.name for p in written][0] == "records.csv"
    assert [p.parent.name for p, _ in skipped] == ["c"]
    saved = list(csv.DictReader((tmp_path / "out" / "records.csv").open()))
    assert sorted(r["model_id"] for r in saved) == ["m-a", "m-b"]
    assert sorted(float(r["accuracy.top1"]) for r in saved) == [70.0, 71.5]
    overrides = {r["model_id"]: json.loads(r["quant.overrides"]) for r in saved}
    assert overrides["m-b"] == [{"keep_float": True, "pattern": "fc"}] and overrides["m-a"] == []
    assert len(table) == 2


def test_collect_cli_says_when_parquet_cannot_be_written(tmp_path: Path) -> None:
    write_record(tmp_path / "runs" / "0", record("m-a", 70.0, []))
    cli = [sys.executable, str(ROOT / "experiments" / "collect.py")]
    result = subprocess.run([*cli, str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "records.csv").exists()
    from collect import parquet_engine

    if parquet_engine() is None:
        assert "records.parquet not written: Parquet needs pyarrow" in result.stderr
    else:
        assert (tmp_path / "runs" / "records.parquet").exists()


def test_collect_refuses_missing_and_empty_trees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from collect import main

    assert main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: records: {tmp_path / 'missing'} does not exist " \
        "(give the directory that holds the runs)\n"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "record.json").write_text("[]")
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: records: no valid record.json under")
    assert not (tmp_path / "records.csv").exists()


def test_slurm_preset_renders_an_sbatch_script_with_gpus_ddp_tasks_signal_and_requeue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Map the preset to submitit's SLURM executor as hydra-submitit-launcher does, and render the script
    (nothing is submitted: an ``srun`` placeholder only satisfies submitit's "am I on a cluster" check)."""
    import submitit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = compose_run(["launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
                       "hydra.launcher.gpus_per_node=4", "hydra.job.name=run"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert isinstance(params, dict)
    params.pop("_target_")
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -c pass", "uid")
    for flag in ("--partition=gpu", "--account=proj", "--gpus-per-node=4", "--ntasks-per-node=4",
                 "--cpus-per-task=8", "--time=1440", "--signal=USR2@120", "--requeue", "--mem=64GB"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "export OMP_NUM_THREADS=8" in script
