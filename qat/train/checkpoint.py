"""Training checkpoints that survive kills and detect damage.

File format: one line of header ``QATCKPT1 <sha256 hex of the payload> <payload bytes>\\n``, then the payload
(``torch.save`` of the state). Written atomically (temporary file, fsync, rename: ``qat.records``), so a kill
leaves the old file or the new one, never half of one. Before a new checkpoint replaces ``<phase>_last.pt``, the
old one is kept as ``<phase>_prev.pt`` (a hard link, so ``_last`` never goes missing). On load the checksum is
verified; a truncated or corrupted ``_last`` is reported in one log line and the previous good one is used.
Files without the header (written before checksums existed) are read as plain ``torch.save`` files.

Every file is unpickled with ``torch.load(weights_only=True)``: tensors, numbers, strings, ``None`` and
containers only, with or without the header (a sha256 anyone can compute is a checksum, not a signature).
A pickle naming any other Python global (which could run code while loading) is refused as
:class:`UnsafeCheckpoint`. The state qat saves needs nothing more: :func:`rng_state` stores NumPy's generator
state as a tensor and plain numbers.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qat.errors import QatError
from qat.records import atomic_write_bytes

log = logging.getLogger("qat")

MAGIC = b"QATCKPT1"
_HEADER_MAX = 128  # bytes; the header line is 8 + 1 + 64 + 1 + up to 20 digits + 1


class CheckpointDamaged(QatError):
    """A checkpoint file that cannot be trusted: truncated, bit-flipped or not a checkpoint at all."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(str(path), problem, "delete it to start that phase again")
        self.path = path


class UnsafeCheckpoint(CheckpointDamaged):
    """A file whose pickle needs more than tensors and plain data to load: unpickling it could run code."""

    def __init__(self, path: Path, problem: str, fix: str) -> None:
        QatError.__init__(self, str(path), problem, fix)
        self.path = path


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_BOILERPLATE = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation",
                "In PyTorch 2.6", "WeightsUnpickler error:")


def load_weights_only(path: Path, payload: bytes, *, ours: bool = False) -> Any:
    """``torch.load(payload, weights_only=True)`` on the CPU (``payload``: the bytes of ``path``, or of its
    payload when it has qat's header: ``ours``); :class:`UnsafeCheckpoint` when the pickle names a Python
    global beyond tensors and plain data, :class:`CheckpointDamaged` when it cannot be read."""
    try:
        with warnings.catch_warnings():  # protocol-4 pickles: torch warns, then refuses or reads them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found is None:  # garbage, truncation, pickle opcodes torch does not read: damage, not code
            raise CheckpointDamaged(path, f"cannot be read ({_reason(exc)})") from exc
        what = f"needs the Python global {found.group(1)}"
        if ours and found.group(1).startswith("numpy."):  # NumPy RNG state, as qat pickled it once
            raise UnsafeCheckpoint(path, f"was written by an older qat: it {what}, which qat no longer unpickles",
                                   "delete it to start that phase again") from exc
        raise UnsafeCheckpoint(
            path, f"is refused: it {what} to load, and qat unpickles only tensors and plain data (anything else "
            "can run code; a checksum header is no signature)",
            "if you trust its source, re-save just the tensors, e.g. torch.save(model.state_dict(), path); "
            "otherwise delete it") from exc
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on truncated or garbage files
        raise CheckpointDamaged(path, f"cannot be read ({_reason(exc)})") from exc


def _reason(exc: Exception) -> str:
    """``Type: first informative line`` of a torch.load error (its weights-only boilerplate left out)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_BOILERPLATE)]
    return f"{type(exc).__name__}: {lines[0].split('. ')[0][:160]}" if lines else type(exc).__name__


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where the previous good checkpoint of ``path`` is kept: ``float_last.pt`` -> ``float_prev.pt``."""
    path = Path(path)
    stem = path.stem.removesuffix("_last") + "_prev" if path.stem.endswith("_last") else path.stem + ".prev"
    return path.with_name(stem + path.suffix)


def encode(state: dict[str, Any]) -> bytes:
    """Header line with the payload's sha256 and length, then the ``torch.save`` payload."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = b"%s %s %d\n" % (MAGIC, hashlib.sha256(payload).hexdigest().encode(), len(payload))
    return header + payload


def decode(path: Path, data: bytes) -> dict[str, Any]:
    """The state stored in ``data`` (the bytes of ``path``); :class:`CheckpointDamaged` when it does not verify."""
    if data.startswith(MAGIC):
        end = data.find(b"\n", 0, _HEADER_MAX)
        fields = data[:end].split(b" ") if end > 0 else []
        if len(fields) != 3 or not fields[2].isdigit():
            raise CheckpointDamaged(path, "has a damaged checkpoint header")
        payload = data[end + 1:]
        if len(payload) != int(fields[2]):
            raise CheckpointDamaged(path, f"is truncated ({len(payload)} of {int(fields[2])} payload bytes)")
        if hashlib.sha256(payload).hexdigest().encode() != fields[1]:
            raise CheckpointDamaged(path, "fails its sha256 checksum (corrupted on disk)")
    else:
        payload = data  # written before checksums existed: a plain torch.save file
    state = load_weights_only(path, payload, ours=data.startswith(MAGIC))
    if not isinstance(state, dict):
        raise CheckpointDamaged(path, f"holds a {type(state).__name__}, not a checkpoint dict")
    return state


def read_checkpoint_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """One checkpoint file, verified (no fallback to the previous one)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointDamaged(path, f"cannot be read ({exc.strerror or exc})") from exc
    return decode(path, data)


def _keep_previous(path: Path) -> None:
    """Make ``previous_path(path)`` the current ``path`` (hard link, or a copy where links are unsupported),
    atomically replacing the older previous checkpoint; ``path`` itself stays in place."""
    previous = previous_path(path)
    tmp = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links: the same bytes by copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any], *, keep_previous: bool = True
                    ) -> Path:
    """Write ``state`` to ``path`` atomically with a checksum; the file it replaces becomes the previous one."""
    path = Path(path)
    data = encode(state)
    if keep_previous and path.exists():
        _keep_previous(path)
    atomic_write_bytes(path, data)
    return path


def resume_state(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path] | None:
    """The newest good checkpoint of ``path`` (``path`` itself, else its previous one) and the file it came
    from; ``None`` when neither exists. A damaged file is reported in one log line and skipped; when every
    existing file is damaged, :class:`CheckpointDamaged` names them."""
    path = Path(path)
    damaged: list[CheckpointDamaged] = []
    for candidate in (path, previous_path(path)):
        if not candidate.exists():
            continue
        try:
            state = read_checkpoint_file(candidate)
        except CheckpointDamaged as exc:
            damaged.append(exc)
            continue
        if damaged:
            log.warning("checkpoint %s %s: using the previous good checkpoint %s", path, damaged[0].problem,
                        candidate)
        return state, candidate
    if damaged:
        names = " and ".join(str(exc.path) for exc in damaged)
        raise QatError(str(path), f"no good checkpoint ({'; '.join(e.problem for e in damaged)})",
                       f"delete {names} to start that phase again")
    return None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The state of the newest good checkpoint of ``path`` (see :func:`resume_state`); one that is missing or
    damaged with no good previous one raises :class:`~qat.errors.QatError` naming the file."""
    found = resume_state(path)
    if found is None:
        raise QatError(str(path), "does not exist", "give an existing checkpoint file")
    return found[0]


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from (torch CPU and CUDA, Python, NumPy), so a run
    resumed mid-epoch continues with the same random numbers (dropout, augmentation). Tensors, ints, floats,
    strings and tuples only, so that ``weights_only`` loading reads it back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def reuse_or_train(model: torch.nn.Module, cached: Path, *, enabled: bool, train: Callable[[], object],
                   write: bool = True) -> str:
    """Float weights from ``cached`` when an identical recipe trained them before (``enabled``), else ``train()``
    and keep the result there (when ``write``: DDP rank 0 only). Returns where the weights came from."""
    if enabled and cached.exists():
        model.load_state_dict(load_checkpoint(cached)["model"])
        log.info("[float] loaded float weights trained earlier by the same recipe: %s", cached)
        return f"cache:{cached}"
    train()
    if enabled and write:
        save_checkpoint(cached, {"model": model.state_dict(), "recipe_key": cached.stem})
    return "trained"
