"""The .pte export format (ExecuTorch program with the XNNPACK delegate), via the executorch adapter's
``to_pte_bytes(int_model)``, ``to_pte_bytes_float(module, example)`` and ``load_pte(bytes_or_path, threads)``."""

from __future__ import annotations

import os

import torch
from torch import nn

from qat.engines.registry import Engine, adapter
from qat.intmodel.graph import IntModel

SUFFIX = ".pte"
ENGINE = "executorch_xnnpack"


def int_bytes(int_model: IntModel) -> bytes:
    return adapter(ENGINE).to_pte_bytes(int_model)


def float_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    return adapter(ENGINE).to_pte_bytes_float(module, example)


def load(source: bytes | str | os.PathLike[str], threads: int = 1) -> Engine:
    return adapter(ENGINE).load_pte(source, threads)
