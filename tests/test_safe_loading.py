"""Files qat reads cannot run code (issue 16 items 3 and 4).

Every checkpoint, weights file and model file is unpickled with ``weights_only=True``, with or without qat's
sha256 header (a checksum anyone can compute, not a signature). A pickle whose loading would write a file is
refused with one line through every way in: ``read_checkpoint_file``, resuming, ``model.weights`` (classifier and
detector), ``model.backbone_weights`` and ``experiments/eval.py checkpoint=``; the file is never written. What qat
itself saves (model, optimizer, GradScaler, RNG state, run id) reads back under the same rule and resumes the
same random streams. A damaged ``int_model.pt`` given to eval.py is one line saying what the file is and why it
cannot be read.
"""

from __future__ import annotations

import io
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import load_eval_app

from qat.detection.models import build_detector
from qat.errors import QatError
from qat.intmodel.graph import IntModel, IntNode
from qat.models import build_model
from qat.train.checkpoint import (
    CheckpointDamaged,
    UnsafeCheckpoint,
    encode,
    read_checkpoint_file,
    resume_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

ROOT = Path(__file__).resolve().parents[1]


class WritesWithOpen:
    """Unpickling this calls ``open(path, "w")``: it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


class TouchesWithSystem:
    """Unpickling this runs ``touch path`` in a shell."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.path))}",)


def _weights() -> dict[str, torch.Tensor]:
    return build_model("mobilenet_v1", width_mult=0.25, num_classes=5, resolution=32).state_dict()


def plant(path: Path, marker: Path, *, payload: str, header: bool, legacy: bool = False) -> Path:
    """A weights file whose unpickling would create ``marker``; with qat's valid sha256 header when ``header``,
    in torch's pre-zip format when ``legacy``."""
    evil = WritesWithOpen(marker) if payload == "open" else TouchesWithSystem(marker)
    state = {"model": _weights(), "epoch": 1, "step": 3, "hook": evil}
    if header:
        path.write_bytes(encode(state))  # qat's own format: the header verifies
    else:
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


CASES = [pytest.param(p, h, lg, id=f"{p}-{'header' if h else 'plain'}{'-legacy' if lg else ''}")
         for p in ("open", "system") for h in (False, True) for lg in (False, True) if not (h and lg)]


def test_the_planted_pickle_does_run_code_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The control: the planted files are dangerous, so the refusals below are not vacuous."""
    for payload in ("open", "system"):
        marker = tmp_path / f"ran-{payload}"
        path = plant(tmp_path / f"{payload}.pt", marker, payload=payload, header=False)
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize(("payload", "header", "legacy"), CASES)
def test_read_checkpoint_file_and_resume_refuse_code(payload: str, header: bool, legacy: bool,
                                                      tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = plant(tmp_path / "float_last.pt", marker, payload=payload, header=header, legacy=legacy)
    with pytest.raises(UnsafeCheckpoint) as caught:
        read_checkpoint_file(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: is refused: it needs the Python global ")
    assert ("open" if payload == "open" else "system") in message and "torch.save(model.state_dict()" in message
    with pytest.raises(QatError, match=r"no good checkpoint \(is refused"):
        resume_state(path)
    assert not marker.exists()


@pytest.mark.parametrize(("payload", "header", "legacy"), CASES)
def test_model_weights_refuse_code(payload: str, header: bool, legacy: bool, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = plant(tmp_path / "weights.pth", marker, payload=payload, header=header, legacy=legacy)
    with pytest.raises(QatError, match=rf"^model.weights: {path} is refused: it needs the Python global") as caught:
        build_model("mobilenet_v1", width_mult=0.25, num_classes=5, resolution=32, weights=str(path))
    assert "\n" not in str(caught.value)
    for kwargs, key in (({"weights": str(path)}, "model.weights"),
                        ({"backbone_weights": str(path)}, "model.backbone_weights")):
        with pytest.raises(QatError, match=rf"^{key}: {path} is refused"):
            build_detector("mobilenet_v1", num_categories=2, width_mult=0.25, resolution=64, **kwargs)
    assert not marker.exists()


def load_eval_module() -> Any:
    return load_eval_app("qat_eval_app_safe")


@pytest.mark.parametrize(("payload", "header", "legacy"), CASES)
def test_eval_checkpoint_refuses_code(payload: str, header: bool, legacy: bool, tmp_path: Path) -> None:
    evaluation = load_eval_module()
    marker = tmp_path / "ran"
    path = plant(tmp_path / "int_model.pt", marker, payload=payload, header=header, legacy=legacy)
    cfg = evaluation.EvalConfig(checkpoint=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(QatError, match=rf"^checkpoint: {path} is refused: it needs the Python global"):
        evaluation.evaluate(cfg)
    assert not marker.exists()


def test_eval_app_refuses_code_with_one_line_and_exit_2(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = plant(tmp_path / "weights.pth", marker, payload="system", header=True)
    env = {**os.environ, "QAT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("QAT_DEBUG", None)
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "eval.py"), f"checkpoint={path}",
                             f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint: {path} is refused"), result.stderr
    assert not marker.exists()


def test_what_qat_saves_reads_back_weights_only_and_resumes_the_same_random_numbers(tmp_path: Path) -> None:
    model = build_model("mobilenet_v1", width_mult=0.25, num_classes=5, resolution=32)
    for name in ("SGD", "AdamW", "RMSprop"):
        optimizer = getattr(torch.optim, name)(model.parameters(), lr=0.1)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        random.seed(3)
        np.random.seed(4)
        np.random.standard_normal()  # leaves a cached Gaussian: has_gauss / gauss must survive
        torch.manual_seed(5)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2, "step": 7,
                 "batch_in_epoch": 3, "phase": "qat", "rng": rng_state(), "tracking_run_id": "abc123",
                 "best_top1": float("-inf"), "scaler": torch.amp.GradScaler("cpu").state_dict()}
        expected = (random.random(), np.random.standard_normal(), np.random.randint(1 << 30), torch.rand(3))
        save_checkpoint(tmp_path / f"{name}_last.pt", state)
        loaded = read_checkpoint_file(tmp_path / f"{name}_last.pt")  # weights_only, no extra globals
        assert loaded["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
        assert loaded["scaler"] == state["scaler"] and loaded["best_top1"] == float("-inf")
        getattr(torch.optim, name)(model.parameters(), lr=0.1).load_state_dict(loaded["optimizer"])
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        set_rng_state(loaded["rng"])
        again = (random.random(), np.random.standard_normal(), np.random.randint(1 << 30), torch.rand(3))
        assert again[:3] == expected[:3] and torch.equal(again[3], expected[3])


def test_checkpoint_of_an_older_qat_with_pickled_numpy_state_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "qat_last.pt"
    save_checkpoint(path, {"model": _weights(), "rng": {"numpy": np.random.get_state()}})
    with pytest.raises(UnsafeCheckpoint, match=r"was written by an older qat: it needs the Python global numpy\."
                                               r".*\(delete it to start that phase again\)$"):
        read_checkpoint_file(path)


def _tiny_int_model(path: Path) -> Path:
    node = IntNode(name="input", op="quantize", inputs=[], out=None)
    return IntModel(nodes=[node], input_shape=[1, 3, 32, 32], meta={"arch": "mobilenet_v2"}).save(path)


def test_eval_names_what_a_damaged_file_is_and_why_it_cannot_be_read(tmp_path: Path) -> None:
    evaluation = load_eval_module()
    good = _tiny_int_model(tmp_path / "good" / "int_model.pt")
    assert evaluation.is_int_model(good) is True
    torch.save(_weights(), tmp_path / "float.pth")
    assert evaluation.is_int_model(tmp_path / "float.pth") is False
    save_checkpoint(tmp_path / "float_last.pt", {"model": _weights()})
    assert evaluation.is_int_model(tmp_path / "float_last.pt") is False

    damaged = tmp_path / "int_model.pt"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a copy cut short
    with pytest.raises(QatError) as caught:
        evaluation.evaluate(evaluation.EvalConfig(checkpoint=str(damaged), cache_dir=str(tmp_path / "cache")))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint: {damaged} is a qat integer model, but it cannot be read (")
    assert "convert the model again" in message

    cut = tmp_path / "cut_last.pt"
    cut.write_bytes((tmp_path / "float_last.pt").read_bytes()[:-10])
    with pytest.raises(QatError, match=rf"^checkpoint: {cut} is a qat checkpoint \(float weights\), but it is "
                                       r"truncated"):
        evaluation.is_int_model(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"these are not weights")
    with pytest.raises(QatError, match=rf"^checkpoint: {junk} is neither an integer model nor float weights qat "
                                       r"can read: it cannot be read \("):
        evaluation.is_int_model(junk)


def test_garbage_is_damage_not_a_refusal(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(CheckpointDamaged) as caught:
        read_checkpoint_file(junk)
    assert not isinstance(caught.value, UnsafeCheckpoint)
    buffer = io.BytesIO()
    torch.save([1, 2], buffer)
    (tmp_path / "list.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointDamaged, match="holds a list, not a checkpoint dict"):
        read_checkpoint_file(tmp_path / "list.pt")
