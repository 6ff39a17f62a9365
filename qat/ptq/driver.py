"""The run pipeline's post-training branch (``method=ptq``): calibration data, the PTQ methods, the record's
method name, and whether the result has an integer form.

Kept apart from :mod:`qat.pipeline` so the pipeline only chooses between QAT fine-tuning and this step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn

from qat.data.calibration import calibration_loader
from qat.errors import NoIntegerForm, choice_error
from qat.ptq.apply import methods_tag, run_ptq
from qat.ptq.config import PtqConfig
from qat.ptq.two_tensor import check_convertible
from qat.quant.config import QuantConfig
from qat.quant.prepare import prepare

RUN_METHODS = ("qat", "ptq")


def check_method(method: str) -> None:
    """``method`` of the run config is ``qat`` or ``ptq``."""
    if method not in RUN_METHODS:
        raise choice_error("method", method, RUN_METHODS)


def record_method(method: str, precision: str, ptq: PtqConfig) -> str:
    """The record's top-level ``method`` (what qat.analysis groups and matches paper-table rows by):
    ``float`` for float runs, ``qat``, or ``ptq_<methods>`` for post-training runs, e.g. ``ptq_minmax``
    (the whitepaper's PTQ, Tables 2-6), ``ptq_mse`` (Choukroun §3.1), ``ptq_mse+two_tensor`` (Choukroun §3.3),
    ``ptq_minmax+adaquant`` (Hubara §3)."""
    check_method(method)
    if precision == "float":
        return "float"
    return "qat" if method == "qat" else f"ptq_{methods_tag(ptq)}"


def quant_config(quant: Any) -> QuantConfig:
    """The :class:`QuantConfig` part of the run's ``quant`` group (drops ``precision``, ``calibration_batches``)."""
    fields = {f.name for f in dataclasses.fields(QuantConfig)}
    return QuantConfig(**{k: v for k, v in dataclasses.asdict(quant).items() if k in fields})


def _on_device(loader: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in loader:
        yield images.to(device), labels


def prepare_and_post_train(model: nn.Module, quant: Any, ptq: PtqConfig, *, data_root: str, resolution: int,
                           batch_size: int, resize_ratio: float, seed: int, workers: int = 0,
                           device: torch.device | str = "cpu") -> tuple[fx.GraphModule, dict[str, Any]]:
    """Prepare simulated quantization of ``model`` (a copy; the float model is unchanged) with ``quant`` and run
    the ``ptq`` methods on it with training images seen through the evaluation transform
    (:mod:`qat.data.calibration`); return the prepared model and :func:`qat.ptq.apply.run_ptq`'s report."""
    device = torch.device(device)
    example = torch.zeros(1, 3, resolution, resolution, device=device)
    prepared = prepare(model, quant_config(quant), example)
    loader = calibration_loader(data_root, resolution=resolution, batch_size=batch_size, seed=seed,
                                resize_ratio=resize_ratio, workers=workers)
    return prepared, run_ptq(prepared, _on_device(loader, device), ptq)


def not_convertible_reason(prepared: fx.GraphModule) -> str | None:
    """Why ``prepared`` has no canonical integer model (a two-tensor layer, Choukroun §3.3), or ``None``."""
    try:
        check_convertible(prepared)
    except NoIntegerForm as exc:
        return exc.one_line()
    return None


__all__ = ["RUN_METHODS", "check_method", "not_convertible_reason", "prepare_and_post_train", "quant_config",
           "record_method"]
