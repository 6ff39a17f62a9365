"""The one table of inference engines: name -> how to build int8 (from an IntModel) and float (from a module).

Every engine's callable takes a float NCHW tensor and returns float logits. Adapters are imported only when an
engine is used, so a missing optional package fails with one clear line (``latency.engine``) and never falls back
to another engine or to float. PyTorch engines (``torch_eager``, ``torch_native_*``) run with
``torch.get_num_threads()`` threads, which :func:`qat.latency.harness.measure` sets; the others take ``threads``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from qat.errors import QatError, choice_error
from qat.intmodel.graph import IntModel

KEY = "latency.engine"
Engine = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EngineEntry:
    """One engine: the adapter module that implements it, the package it needs, what it can run, and the
    constraints of its int8 kernels (data, read by :mod:`qat.targets` and the saturation diagnostic)."""

    name: str
    adapter: str
    package: str
    precisions: tuple[str, ...]
    backend: str | None = None  # torch_native's quantized backend
    max_bits: int = 8  # widest weight/activation grid its int8 kernels hold
    symmetric_weights: bool = False  # needs zero-point-0 weights
    # x86 CPU flags with which its u8·s8 GEMM accumulates exactly in int32; without any of them it adds product
    # pairs in saturating int16 (vpmaddubsw, qat.intmodel.saturation). None: exact on every host.
    exact_int8_flags: tuple[str, ...] | None = None
    # environment variable that restricts the engine's kernels to an older ISA whatever the CPU has
    # (fbgemm: FBGEMM_ENABLE_INSTRUCTIONS=AVX2 selects its AVX2 kernels on a VNNI host; torch's x86 backend still
    # sends convolutions with symmetric weights to oneDNN there, which stays exact, so only part of it saturates)
    isa_env: str | None = None


_FBGEMM_EXACT = ("avx512_vnni",)  # fbgemm's VNNI kernels are AVX-512 only (not AVX-VNNI)
_FBGEMM_ISA_ENV = "FBGEMM_ENABLE_INSTRUCTIONS"
_MLAS_EXACT = ("avx512_vnni", "avx_vnni", "amx_int8")  # MLAS u8s8 has AVX-512 VNNI and AVX-VNNI kernels

ENGINES: dict[str, EngineEntry] = {e.name: e for e in (
    EngineEntry("torch_eager", "qat.models.fold", "torch", ("float",)),
    EngineEntry("torch_native_x86", "qat.engines.torch_native", "torch", ("int8",), "x86",
                exact_int8_flags=_FBGEMM_EXACT, isa_env=_FBGEMM_ISA_ENV),
    EngineEntry("torch_native_fbgemm", "qat.engines.torch_native", "torch", ("int8",), "fbgemm",
                exact_int8_flags=_FBGEMM_EXACT, isa_env=_FBGEMM_ISA_ENV),
    EngineEntry("torch_native_qnnpack", "qat.engines.torch_native", "torch", ("int8",), "qnnpack"),
    EngineEntry("onnxruntime", "qat.engines.onnxruntime_qdq", "onnxruntime", ("float", "int8"),
                exact_int8_flags=_MLAS_EXACT),
    EngineEntry("executorch_xnnpack", "qat.engines.executorch_xnnpack", "executorch", ("float", "int8"),
                symmetric_weights=True),
)}
ENGINE_NAMES = tuple(ENGINES)


def entry(name: str) -> EngineEntry:
    """The table row of ``name``; an unknown name lists the valid ones."""
    if name not in ENGINES:
        raise choice_error(KEY, name, ENGINE_NAMES)
    return ENGINES[name]


def adapter(name: str) -> ModuleType:
    """Import the engine's adapter; a missing package or adapter is a clear error, not a fallback."""
    e = entry(name)
    try:
        importlib.import_module(e.package)
    except ImportError as exc:
        raise QatError(KEY, f"engine {name!r} needs the Python package {e.package!r}, which is not installed "
                       f"({exc})", f"pip install {e.package}, or choose another engine") from exc
    try:
        return importlib.import_module(e.adapter)
    except ModuleNotFoundError as exc:
        if exc.name != e.adapter:
            raise
        raise QatError(KEY, f"engine {name!r}: its adapter {e.adapter} is not part of this qat installation",
                       "update qat, or choose another engine") from exc


def is_installed(name: str) -> bool:
    """Whether ``name``'s package and adapter import on this machine."""
    try:
        adapter(name)
    except QatError:
        return False
    return True


def _check_precision(e: EngineEntry, precision: str) -> None:
    if precision not in e.precisions:
        runs = [n for n, other in ENGINES.items() if precision in other.precisions]
        raise QatError(KEY, f"engine {e.name!r} has no {precision} path (it runs: {', '.join(e.precisions)})",
                       f"for {precision} choose one of: {', '.join(runs)}")


class _TorchEager:
    """Float PyTorch eager with BN folded (the deployment form of the float model)."""

    def __init__(self, module: nn.Module) -> None:
        from qat.models.fold import fold_batch_norm

        self.module = fold_batch_norm(module).eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(x)


def build_int(name: str, int_model: IntModel, threads: int = 1) -> Engine:
    """The int8 engine ``name`` running ``int_model`` (grids below 8 bits in 8-bit containers, flagged by the
    callable's ``emulated_bits``)."""
    e = entry(name)
    _check_precision(e, "int8")
    module = adapter(name)
    if e.backend is not None:
        return module.build(int_model, e.backend)
    return module.build_int(int_model, threads)


def build_float(name: str, module: nn.Module, example: torch.Tensor, threads: int = 1) -> Engine:
    """The float engine ``name`` running ``module`` (BN folded) on inputs shaped like ``example``."""
    e = entry(name)
    _check_precision(e, "float")
    if name == "torch_eager":
        return _TorchEager(module)
    return adapter(name).build_float(module, example, threads)


def engine_info(name: str) -> dict[str, str]:
    """``{"engine": name, "engine_version": ...}`` for records."""
    e = entry(name)
    if e.backend is not None:  # torch_native: also which kernel ran the depthwise convolutions
        from qat.engines import torch_native

        return {**torch_native.engine_info(e.backend), "engine": name}
    if e.package == "torch":
        return {"engine": name, "engine_version": torch.__version__.split("+")[0]}
    info = dict(adapter(name).engine_info())
    info["engine"] = name
    return info
