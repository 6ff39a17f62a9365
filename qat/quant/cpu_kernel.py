"""qat's CPU kernel for the QAT step: the C++ ops of ``qat/quant/csrc/fake_quant.cpp``, built once per machine.

Each op does in one call (and its backward in one pass) what a chain of ATen ops does in :mod:`qat.quant`, with
the same float32 arithmetic element for element: the fake quantizer (Jacob §3 eq. 12, STE mask), a per-tensor EMA
activation quantizer's whole step (§3.1), a weight quantizer with the BN fold and its own range, the BN folds
(running statistics; Jacob eq. 14's batch moments, whose reduction alone is float64 like torch.var_mean's and may
differ from it by one ulp), the int32 bias (§2.4) and the ReLU/ReLU6 gradient mask. One op computes its ATen chain
in another, closed form: the whitepaper's σ/σ_B correction with batch norm (§3.2.2), as close to float64 truth as
the ATen ops or closer, not bit for bit. ``tests/test_cpu_kernel.py`` compares each with the ATen ops, outputs and
gradients.

The kernel is compiled with ``torch.utils.cpp_extension.load`` (checked against torch 2.14.1) the first time a
process needs it: about 10 s on a 2-core machine, printed, then cached in torch's extension directory
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) for every later process; ``make install``
builds it (``python -m qat.quant.cpu_kernel``). It needs a C++ compiler (``c++``) and ninja (a dependency).

``QAT_CPU_KERNEL`` chooses: ``auto`` (default) builds it and, if that fails, logs one warning with the reason and
fake-quantizes with the ATen ops (same numbers, slower); ``fused`` makes a failed build an error; ``aten`` never
builds it. :func:`describe` says which ran (the record's ``training.fake_quant_kernel``).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from qat.errors import QatError, choice_error

ENV_VAR = "QAT_CPU_KERNEL"
CHOICES = ("auto", "fused", "aten")
SOURCE = Path(__file__).with_name("csrc") / "fake_quant.cpp"
NAME = "qat_cpu_kernels"
CHECKED_AGAINST = {"torch": "2.14.1"}

log = logging.getLogger("qat")
_loaded: dict[str, Any] = {}  # "ops": torch.ops.qat_cpu once built, or "reason": why not


def choice() -> str:
    value = os.environ.get(ENV_VAR, "auto") or "auto"
    if value not in CHOICES:
        raise choice_error(ENV_VAR, value, CHOICES)
    return value


def compile_flags() -> list[str]:
    """No fused multiply-add (-ffp-contract=off: x·(1/S) is rounded before Z is added, as torch does), AVX2 where
    the host has it (the loops vectorize; nearbyint becomes vroundps), OpenMP (``at::parallel_for`` is inline
    OpenMP code: without it the kernel runs on one thread; libgomp resolves to the copy torch already loaded)."""
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        from qat.targets import host_machine

        if "avx2" in host_machine()[0]:
            flags.append("-mavx2")
    return flags


def _build() -> Any:
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    # its warnings (no CUDA runtime; a compiler other than the one torch was built with) are noise here: a build
    # that fails is reported by ops() in one line with the compiler's own first error
    cpp_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension

        bin_dir = str(Path(sys.executable).parent)  # the venv's ninja, when the venv is not activated
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        start = time.perf_counter()
        cpp_extension.load(NAME, sources=[str(SOURCE)], extra_cflags=compile_flags(), extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
        elapsed = time.perf_counter() - start
    finally:
        cpp_log.setLevel(level)
    if elapsed > 2:  # a real compilation, not a cache hit
        # on stderr: a process's stdout is its output (a script's table, a subprocess's numbers), not this note
        print(f"qat: built the fused CPU fake-quantize kernel in {elapsed:.0f} s (cached for later runs)",
              file=sys.stderr, flush=True)
    return torch.ops.qat_cpu


def _reason(err: Exception) -> str:
    """One line for a failed build: the compiler's first error where there is one, else the message's last line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    missing = [line for line in lines if "not found" in line or "No such file" in line]
    detail = (errors or missing or lines[-1:] or [""])[0]
    return f"{type(err).__name__}: {detail}"


def ops() -> Any | None:
    """``torch.ops.qat_cpu`` (every op of ``csrc/fake_quant.cpp``), built on first call; ``None`` when
    ``QAT_CPU_KERNEL=aten`` or the build failed under ``auto``."""
    if "ops" in _loaded:
        return _loaded["ops"]
    mode = choice()
    if mode == "aten":
        _loaded.update(ops=None, reason=f"{ENV_VAR}=aten")
        return None
    try:
        _loaded.update(ops=_build(), reason=None)
    except Exception as err:  # noqa: BLE001 - a compiler or ninja missing, or a build error: say which
        reason = _reason(err)
        if mode == "fused":
            raise QatError(ENV_VAR, f"the fused CPU kernel could not be built ({reason})",
                           "install a C++ compiler (e.g. apt install g++), or set "
                           f"{ENV_VAR}=aten to fake-quantize with ATen ops") from err
        log.warning("qat: the fused CPU fake-quantize kernel could not be built (%s); fake quantization uses ATen "
                    "ops (same numbers, slower QAT steps). Install a C++ compiler, or set %s=aten to skip the "
                    "build.", reason, ENV_VAR)
        _loaded.update(ops=None, reason=reason)
    return _loaded["ops"]


@contextmanager
def aten_path() -> Iterator[None]:
    """Fake-quantize with the ATen ops inside the block (to compare both paths in one process)."""
    saved = dict(_loaded)
    _loaded.update(ops=None, reason="qat.quant.cpu_kernel.aten_path()")
    try:
        yield
    finally:
        _loaded.clear()
        _loaded.update(saved)


def describe() -> dict[str, str]:
    """What fake-quantizes float32 CPU tensors in this process: ``fused_cpu`` or ``aten`` (with the reason)."""
    if ops() is not None:
        return {"fake_quant_kernel": "fused_cpu"}
    return {"fake_quant_kernel": "aten", "fake_quant_kernel_reason": str(_loaded.get("reason"))}


def main() -> None:
    """``python -m qat.quant.cpu_kernel``: build (or find cached) the kernel and say which path QAT will use."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"qat: fused CPU fake-quantize kernel ({SOURCE.name}, flags {' '.join(compile_flags())})", flush=True)
    print(f"qat: fake quantization on the CPU uses {describe()}", flush=True)


if __name__ == "__main__":
    main()


__all__ = ["CHOICES", "ENV_VAR", "aten_path", "choice", "compile_flags", "describe", "ops"]
