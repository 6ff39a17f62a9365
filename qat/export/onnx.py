"""The .onnx export format: QDQ int8 from an integer model, float from a module, loaded with ONNX Runtime."""

from __future__ import annotations

import os

import torch
from torch import nn

from qat.engines.registry import Engine
from qat.intmodel.graph import IntModel

SUFFIX = ".onnx"


def int_bytes(int_model: IntModel) -> bytes:
    """The QDQ ONNX program of an integer model (see :mod:`qat.engines.onnxruntime_qdq`)."""
    from qat.engines.onnxruntime_qdq import int_model_to_onnx

    return int_model_to_onnx(int_model)


def float_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    """The float ONNX program of a module with BN folded."""
    from qat.engines.onnxruntime_qdq import float_module_to_onnx

    return float_module_to_onnx(module, example)


def load(source: bytes | str | os.PathLike[str], threads: int = 1) -> Engine:
    """An ONNX Runtime engine from the program's bytes or file."""
    from qat.engines.onnxruntime_qdq import load as load_onnx

    return load_onnx(source, threads)
