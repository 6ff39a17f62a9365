"""Bad input, table-driven, through the real command-line apps (issue 10 item 4).

Every case: non-zero exit, one line naming the config key or path and the fix (Hydra's own compose errors for
an unknown preset or a misspelt key are Hydra's several lines, without a traceback), no record written, no
traceback unless QAT_DEBUG=1. Most cases call the app's ``main`` in this process (fast); those marked
``subprocess`` run the script as a user would, one of them with a broken ``onnxruntime`` package shadowing the
real one on PYTHONPATH (an engine that is not installed).
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from qat.quant import cpu_kernel, fused
from qat.train.checkpoint import previous_path, read_checkpoint_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAME = {"run": "run", "detect": "detect", "report": "report", "latency": "latency_app"}
TINY = ["model.width_mult=0.35", "model.resolution=32", "train.float_epochs=1", "train.qat_epochs=1",
        "data.batch_size=4", "data.eval_batch_size=4", "latency.repeats=2", "latency.warmup=1",
        "latency.min_time_s=0", "train.threads=1", "train.cache_float=false"]


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (40, 40, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)


def _tree(root: Path, classes: dict[str, tuple[str, ...]] | None = None) -> Path:
    """A tiny ImageFolder tree: 2 classes, 4 train and 2 val images each (or the classes given per split)."""
    classes = classes or {"train": ("a", "b"), "val": ("a", "b")}
    for split, names in classes.items():
        for c, name in enumerate(names):
            for i in range(4 if split == "train" else 2):
                _image(root / split / name / f"{i}.png", seed=100 * c + i + (50 if split == "val" else 0))
    return root


def _good(tmp: Path) -> str:
    return str(_tree(tmp / "data"))


def _unreadable(tmp: Path) -> str:
    root = _tree(tmp / "data")
    (root / "train" / "b" / "9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return str(root)


def _no_val(tmp: Path) -> str:
    return str(_tree(tmp / "data", {"train": ("a", "b")}))


def _class_without_images(tmp: Path) -> str:
    root = _tree(tmp / "data")
    (root / "val" / "c").mkdir()
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "notes.txt").write_text("no images here")
    return str(root)


def _classes_differ(tmp: Path) -> str:
    return str(_tree(tmp / "data", {"train": ("a", "b"), "val": ("a", "z")}))


def _empty(tmp: Path) -> str:
    (tmp / "data").mkdir()
    return str(tmp / "data")


def _other_arch_weights(tmp: Path) -> str:
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp / "resnet18.pth")
    return str(tmp / "resnet18.pth")


def _coco(tmp: Path, train_json: str | None) -> str:
    root = tmp / "coco"
    for split in ("train2017", "val2017"):
        _image(root / split / "1.jpg", seed=1)
    ann = root / "annotations"
    ann.mkdir(parents=True)
    good = {"images": [{"id": 1, "file_name": "1.jpg", "width": 40, "height": 40}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                             "iscrowd": 0}], "categories": [{"id": 1, "name": "thing"}]}
    if train_json is not None:
        (ann / "instances_train2017.json").write_text(train_json)
    (ann / "instances_val2017.json").write_text(json.dumps(good))
    return str(root)


def _broken_onnxruntime(tmp: Path) -> str:
    """A package named onnxruntime whose import fails, first on PYTHONPATH: the engine 'is not installed'."""
    package = tmp / "shadow" / "onnxruntime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('onnxruntime is broken on this machine (test)')\n")
    return str(tmp / "shadow")


@dataclass
class Case:
    id: str
    app: str  # run | detect | report | latency
    args: list[str]
    key: str  # what the message line starts with (after "error: "), {x} filled from setup
    hint: str = ""  # must appear in the line too
    setup: Callable[[Path], object] | None = None  # makes the files of the case under {x}, the test's tmp dir
    subprocess: bool = False
    hydra: bool = False  # Hydra's own compose error: several lines, still no traceback
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Path], None] | None = None


def _nan_keeps_last_good_checkpoint(run_dir: Path) -> None:
    last = run_dir / "checkpoints" / "float_last.pt"
    assert read_checkpoint_file(last)["epoch"] == 1  # epoch 1 ended well; epoch 2 diverged and was not saved
    assert not previous_path(last).exists()


DATA = ["data=imagefolder", "data.root={x}/data", "data.workers=0"]
DETECT_TINY = ["model.width_mult=0.35", "model.resolution=64", "data.batch_size=8", "data.eval_batch_size=8",
               "data.synthetic.train_images=16", "data.synthetic.val_images=8", "data.synthetic.image_size=64",
               "optim.name=sgd", "train.float_epochs=1", "train.qat_epochs=1", "train.qat_lr=1e30", "train.threads=1",
               "train.cache_float=false"]
CASES = [
    Case("unknown model", "run", ["model.arch=resnet9000"], "model.arch", "valid choices: ", subprocess=True),
    Case("unknown precision", "run", ["quant.precision=int3"], "quant.precision", "valid choices: "),
    Case("unknown engine", "run", ["latency.engine=tvm"], "latency.engine", "valid choices: "),
    Case("unknown dataset", "run", ["data.name=cifar10"], "data.name", "valid choices: "),
    Case("unknown preset", "run", ["experiment=no_such_preset"], "experiment", "no option 'no_such_preset'"),
    Case("misspelt key", "run", ["model.widht_mult=0.5"], "model.widht_mult", "not in 'ModelConfig'"),
    Case("weight bits too low", "run", ["quant.weight_bits=1"], "quant.weight_bits", "from 2 to 16"),
    Case("activation bits too high", "run", ["quant.act_bits=17"], "quant.act_bits", "from 2 to 16"),
    Case("EMA decay of 1", "run", ["quant.ema_decay=1.0"], "quant.ema_decay", "outside [0, 1)"),
    Case("per-channel axis 7", "run", ["quant.weight_ch_axis=7", *DATA], "quant.weight_ch_axis", "0", _good),
    Case("unknown optimizer", "run", ["optim.name=adamax", *DATA], "optim.name", "valid choices: ", _good),
    Case("negative schedule step", "run", ["schedule.act_quant_delay=-1"], "schedule.act_quant_delay", ">= 0"),
    Case("unknown compile mode", "run", ["train.compile=true", "train.compile_mode=fast"], "train.compile_mode",
         "valid choices: "),
    Case("unknown fidelity device", "run", ["latency.eval_device=tpu"], "latency.eval_device", "valid choices: "),
    Case("validation subset smaller than the classes", "run", ["data.val_max_images=1", *DATA],
         "data.val_max_images", "use at least 2", _good),
    Case("learned step sizes without QAT", "run", ["quant=w4a4_lsq", "method=ptq"], "quant.act_observer",
         "use method=qat"),
    Case("learned step sizes without calibration", "run", ["quant=w4a4_lsq", "quant.calibration_batches=0"],
         "quant.calibration_batches", "at least 1 batch"),
    Case("lsq_plus for weights", "run", ["quant.weight_observer=lsq_plus"], "quant.weight_observer",
         "quant.weight_observer=lsq"),
    Case("unknown target preset", "run", ["target=tpu"], "target", "no option 'tpu'"),
    Case("unknown CPU kernel choice", "run", [], "QAT_CPU_KERNEL", "valid choices: aten, auto, fused",
         env={"QAT_CPU_KERNEL": "fast"}),
    Case("fused CPU kernel without a compiler", "run", [], "QAT_CPU_KERNEL", "QAT_CPU_KERNEL=aten",
         subprocess=True, env={"QAT_CPU_KERNEL": "fused", "CXX": "{x}/no-such-c++", "TORCH_EXTENSIONS_DIR": "{x}/ext"}),
    Case("unknown target name", "run", ["target.name=tpu"], "target.name", "valid choices: "),
    Case("unknown avx2 grid", "run", ["target=x86_avx2", "target.avx2_grid=weights6"], "target.avx2_grid",
         "valid choices: "),
    Case("target's engine not installed", "run", ["target=generic"], "target.name", "pip install onnxruntime",
         _broken_onnxruntime, subprocess=True, env={"PYTHONPATH": "{x}/shadow"}),
    Case("asymmetric weights on arm", "run", ["target=arm", "quant.weight_symmetric=false"],
         "quant.weight_symmetric", "choose another target"),
    Case("signed 7-bit activations on avx2", "run", ["target=x86_avx2", "target.avx2_grid=acts7",
                                                     "quant.act_symmetric=true"], "quant.act_symmetric",
         "quant.act_symmetric=false"),
    Case("12-bit weights on an int8 target", "run", ["target=x86_vnni", "quant.weight_bits=12"],
         "quant.weight_bits", "8 or fewer"),
    Case("data root missing", "run", ["data=imagefolder", "data.root=/no/such/folder"], "data.root",
         "/no/such/folder", subprocess=True),
    Case("data root not set", "run", ["data=imagefolder"], "data.root", "train/ and val/"),
    Case("data root empty", "run", DATA, "data.root", "{x}/data/train is missing", _empty),
    Case("no val split", "run", DATA, "data.root", "{x}/data/val is missing", _no_val),
    Case("class folder without images", "run", DATA, "data.root", "has no images", _class_without_images),
    Case("classes differ between splits", "run", DATA, "data.root", "only in val: ['z']", _classes_differ),
    Case("unreadable image", "run", [*DATA, "quant=float", "data.workers=2"],  # raised in a loader worker
         "{x}/data/train/b/9_broken.png", "replace or delete", _unreadable, subprocess=True),
    Case("weights of another architecture", "run", ["model.weights={x}/resnet18.pth", *DATA], "model.weights",
         "does not fit this architecture", lambda tmp: (_good(tmp), _other_arch_weights(tmp))),
    Case("weights file missing", "run", ["model.weights=/no/such/weights.pt", *DATA], "model.weights",
         "does not exist", _good),
    Case("resolution too small", "run", ["model.resolution=16", *DATA], "model.resolution", "at least 32x32",
         _good),
    Case("resolution too small for inception", "run", ["model=inception_v3", "model.resolution=64", *DATA],
         "model.resolution", "at least 75x75", _good),
    Case("NaN/Inf loss", "run", [*DATA, "quant=float", "train.float_epochs=2", "optim.schedule=step",
                                 "optim.step_epochs=1", "optim.step_gamma=1e38"],
         "optim.lr", "last good checkpoint", _good, check=_nan_keeps_last_good_checkpoint),
    Case("QAT folding batch norms that never saw data", "run", [*DATA, "train.float_epochs=0"],
         "schedule.bn_freeze_step", "train.float_epochs > 0", _good),
    Case("malformed COCO JSON", "detect", ["data.name=coco", "data.root={x}/coco"],
         "{x}/coco/annotations/instances_train2017.json", "is not valid JSON",
         lambda tmp: _coco(tmp, '{"images": [ {"id": 1,'), subprocess=True),
    Case("COCO annotations missing", "detect", ["data.name=coco", "data.root={x}/coco"],
         "{x}/coco/annotations/instances_train2017.json", "does not exist", lambda tmp: _coco(tmp, None)),
    Case("unknown backbone", "detect", ["model.backbone=vgg16"], "model.backbone", "valid choices: "),
    Case("NaN/Inf loss in detection QAT", "detect", DETECT_TINY, "train.qat_lr", "lower train.qat_lr"),
    Case("report records missing", "report", ["records=/no/such/runs", "out={x}/report"], "records",
         "/no/such/runs"),
    Case("unknown paper table", "report", ["table=no_such_table", "records={x}", "out={x}/report"], "table",
         "no_such_table"),
    Case("latency engine unknown", "latency", ["arch=mobilenet_v2", "resolution=32", "out={x}/lat",
                                              "float_engine=tvm"], "float_engine", "valid choices: "),
    Case("engine not installed", "latency", ["arch=mobilenet_v2", "resolution=32", "out={x}/lat",
                                             "float_engine=onnxruntime", "width_mult=0.35"],
         "float_engine", "pip install onnxruntime", _broken_onnxruntime, subprocess=True,
         env={"PYTHONPATH": "{x}/shadow"}),
]


def _invoke(case: Case, args: list[str], tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str]:
    script = ROOT / "experiments" / f"{case.app}.py"
    if case.subprocess:
        result = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        return result.returncode, result.stdout, result.stderr
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("QAT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    capsys.readouterr()
    try:
        runpy.run_path(str(script), run_name="__main__")  # as `python experiments/<app>.py`, in this process
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    x = str(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path)
    run_dir = tmp_path / "run"
    base = TINY if case.app == "run" else ["latency.repeats=2"] if case.app == "detect" else []
    args = [*base, *(a.replace("{x}", x) for a in case.args)]
    if case.app in ("run", "detect"):
        args.append(f"hydra.run.dir={run_dir}")
    env = {**os.environ, "QAT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           **{k: v.replace("{x}", x) for k, v in case.env.items()}}
    env.pop("QAT_DEBUG", None)
    code, out, err = _invoke(case, args, tmp_path, env, capsys, monkeypatch)

    assert code != 0, err[-2000:]
    assert "Traceback" not in out + err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    hint = case.hint.replace("{x}", x)
    if case.hydra:
        assert hint in err
    else:
        assert len(lines) == 1, err
        line = lines[0].removeprefix("error: ")
        assert line.startswith(case.key.replace("{x}", x)), line
        assert hint in line, line
    assert not list(tmp_path.rglob("record.json"))
    if case.app == "run":  # stopped before any work: the built-in dataset was not generated either
        assert not (tmp_path / "cache" / "data").exists()
    if case.check is not None:
        case.check(run_dir)
    if not case.hydra:
        check_named_key(case, lines[0].removeprefix("error: "), args)


# Error lines that still name a key absent from their app's config: the named module must change, then the
# case leaves this table (check_named_key fails once the key exists, so the entry cannot go stale).
KEY_NOT_IN_CONFIG: dict[str, str] = {}

_SCHEMAS_LOADED: set[str] = set()


def compose_app(app: str, overrides: list[str]) -> DictConfig:
    """The app's composed config (Hydra's compose API, in this process), with its schemas registered."""
    if app not in _SCHEMAS_LOADED:  # the script's module level registers its schemas and resolvers
        runpy.run_path(str(ROOT / "experiments" / f"{app}.py"), run_name="qat_schemas")
        _SCHEMAS_LOADED.add(app)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name=CONFIG_NAME[app], overrides=overrides, return_hydra_config=True)


def config_has_key(cfg: DictConfig, key: str) -> bool:
    """Whether dotted ``key`` names a key of ``cfg``; ``a[anything].b`` is field ``b`` of list ``a``'s items."""
    node: object = cfg
    parts = re.split(r"\.(?![^\[]*\])", key)  # dots outside [...]
    for i, part in enumerate(parts):
        name, bracket, _ = part.partition("[")
        if not isinstance(node, DictConfig) or name not in node.keys():  # noqa: SIM118 - `in cfg` is False for ???
            return False
        if i == len(parts) - 1 and not bracket:
            return True  # the last key exists (whatever its value, ??? included)
        node = node[name]
        if bracket:
            if not isinstance(node, ListConfig):
                return False
            element = node._metadata.element_type
            if isinstance(element, type) and hasattr(element, "__dataclass_fields__"):
                node = OmegaConf.structured(element)
            elif len(node):
                node = node[0]
            else:
                return False
            if i == len(parts) - 1:
                return True
    return True


ENVIRONMENT_VARIABLES = {cpu_kernel.ENV_VAR, fused.ENV_VAR}


def check_named_key(case: Case, line: str, args: list[str]) -> None:
    """The error line names a key of the app's composed config, a path, or (when the overrides do not compose)
    the key of the override the user gave."""
    key = line.split(": ", 1)[0]
    if key in ENVIRONMENT_VARIABLES:  # qat's documented switches (README)
        return
    if os.sep in key:  # a file or folder
        assert Path(key).is_absolute(), f"{case.id}: {line}"
        return
    try:
        cfg = compose_app(case.app, args)
    except Exception:  # noqa: BLE001 - Hydra rejected the overrides themselves: name one of them
        assert key in [a.split("=", 1)[0].lstrip("+~") for a in args], f"{case.id}: {line}"
        return
    exists = config_has_key(cfg, key)
    if case.id in KEY_NOT_IN_CONFIG:
        assert not exists, f"{case.id}: {key} exists now; remove the case from KEY_NOT_IN_CONFIG"
    else:
        assert exists, f"{case.id}: the error names {key!r}, not a key of configs/{CONFIG_NAME[case.app]}.yaml"


@pytest.mark.parametrize(("key", "exists"), [
    ("quant.weight_bits", True), ("quant.weight.bits", False), ("quant.act.ema_decay", False),
    ("quant.overrides[features.0.*].weight_bits", True), ("quant.overrides[fc].bits", False),
    ("data.root", True), ("hydra.run.dir", True), ("model", True), ("model.arch.name", False),
])
def test_config_has_key(key: str, exists: bool) -> None:
    assert config_has_key(compose_app("run", []), key) is exists


def test_hydra_compose_errors_name_the_given_override() -> None:
    with pytest.raises(AssertionError):  # a compose error naming something the user did not type
        check_named_key(Case("x", "run", [], "x"), "quant.weight.bits: no", ["model.widht_mult=1"])
    check_named_key(Case("x", "run", [], "x"), "model.widht_mult: not in 'ModelConfig'", ["model.widht_mult=1"])


def test_qat_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "QAT_DEBUG": "1", "QAT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), "model.arch=resnet9000",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "QatError" in result.stderr and "model.arch" in result.stderr


def test_every_train_key_of_the_run_app_is_a_train_key_of_the_detect_app() -> None:
    """One training engine, one ``train`` schema (issue 17): detection accepts every ``train.*`` key of run.py."""
    run_keys, detect_keys = (set(compose_app(app, []).train.keys()) for app in ("run", "detect"))
    assert run_keys <= detect_keys, sorted(run_keys - detect_keys)
    assert {"device", "amp", "keep_best", "checkpoint_every_steps", "channels_last"} <= detect_keys


@pytest.mark.parametrize("launcher", ["local", "submitit_local", "slurm"])
def test_detect_app_composes_every_launcher(launcher: str) -> None:
    cfg = compose_app("detect", [f"launcher={launcher}"])
    assert cfg.hydra.launcher._target_ == compose_app("run", [f"launcher={launcher}"]).hydra.launcher._target_


def test_the_detect_app_composes_the_run_apps_groups() -> None:
    """One schema (issue 17): detection has every top-level key of run.py, and the groups where the tasks do not
    differ compose to the same values."""
    run_cfg, detect_cfg = compose_app("run", []), compose_app("detect", [])
    assert set(run_cfg.keys()) <= set(detect_cfg.keys()), sorted(set(run_cfg.keys()) - set(detect_cfg.keys()))
    for group in ("method", "quant", "schedule", "optim", "ptq", "latency", "target", "logger"):
        assert detect_cfg[group] == run_cfg[group], group


# One bad input per app under experiments/, run as a user would (issue 17 item 4): every app, Hydra and argparse
# alike, reports it through qat.errors.one_line_errors as one `error:` line on stderr with exit status 2.
# {x} is the test's tmp dir; a new app must add its cases here (test_every_app_has_a_bad_input_case).
APP_BAD_INPUT = [
    ("run", ["model.arch=resnet9000", "hydra.run.dir={x}/run"], "model.arch: unknown value 'resnet9000'"),
    ("detect", ["model.backbone=vgg16", "hydra.run.dir={x}/run"], "model.backbone: unknown value 'vgg16'"),
    ("eval", ["checkpoint={x}/missing.pt", "hydra.run.dir={x}/run"], "checkpoint: {x}/missing.pt does not exist"),
    ("eval", ["hydra.run.dir={x}/run"], "checkpoint: not set"),
    ("eval", ["checkpiont={x}/w.pt"], "checkpiont: Key 'checkpiont' not in 'EvalConfig'"),
    ("latency", ["int_model={x}/missing"], "int_model: {x}/missing does not exist"),
    ("report", ["records={x}/missing", "out={x}/report"], "records: {x}/missing does not exist"),
    ("collect", ["{x}/missing"], "records: {x}/missing does not exist"),
    ("collect", [], "records: missing (required)"),
    ("ingest", ["{x}/missing.txt", "--format", "csv", "--out", "{x}/store"], "{x}/missing.txt: does not exist"),
    ("ingest", ["{x}/perf.txt", "--format", "nvprof", "--out", "{x}/store"], "--format: invalid choice: 'nvprof'"),
]


def test_every_app_has_a_bad_input_case() -> None:
    apps = {p.stem for p in (ROOT / "experiments").glob("*.py") if not p.stem.startswith("_")}
    assert apps == {app for app, _, _ in APP_BAD_INPUT}


@pytest.mark.parametrize(("app", "args", "line"), APP_BAD_INPUT,
                         ids=[f"{app}:{' '.join(args)[:40]}" for app, args, _ in APP_BAD_INPUT])
def test_every_app_reports_bad_input_as_one_error_line_and_exit_2(app: str, args: list[str], line: str,
                                                                  tmp_path: Path) -> None:
    x = str(tmp_path)
    env = {**os.environ, "QAT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("QAT_DEBUG", None)
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{app}.py"),
                             *(a.replace("{x}", x) for a in args)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {line.replace('{x}', x)}"), \
        result.stderr[-2000:]
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.csv"))


def test_hydra_apps_task_functions_unpickle_without_experiments_on_the_path(tmp_path: Path) -> None:
    """Launchers that pickle a Hydra app's task function (submitit, cloudpickle) load it in a process where
    experiments/ is not importable: everything ``main`` refers to, the error wrapper included, comes from qat."""
    import cloudpickle

    for app in ("run", "detect", "eval", "latency", "report"):
        task = runpy.run_path(str(ROOT / "experiments" / f"{app}.py"), run_name=f"qat_pickled_{app}")["main"]
        (tmp_path / f"{app}.pkl").write_bytes(cloudpickle.dumps(task.__wrapped__))  # hydra.main's task function
    child = ("import pathlib, sys, cloudpickle\n"
             "assert not any(pathlib.Path(p or '.').resolve().name == 'experiments' for p in sys.path)\n"
             "for path in sorted(pathlib.Path(sys.argv[1]).glob('*.pkl')):\n"
             "    task = cloudpickle.loads(path.read_bytes())\n"
             "    assert callable(task) and task.__wrapped__.__name__ == 'main', path\n"
             "assert '_cli' not in sys.modules\n"
             "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", child, str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
