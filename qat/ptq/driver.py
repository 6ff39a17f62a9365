"""The run pipeline's post-training branch (``method=ptq``): the method key, the record's
method name, and whether the result has an integer form.

The pipeline (:func:`qat.pipeline.post_train`) prepares the task's core and calls :func:`qat.ptq.apply.run_ptq`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

from qat.errors import NoIntegerForm, choice_error
from qat.ptq.apply import methods_tag
from qat.ptq.config import PtqConfig
from qat.ptq.two_tensor import check_convertible
from qat.quant.config import QuantConfig

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


def not_convertible_reason(prepared: fx.GraphModule) -> str | None:
    """Why ``prepared`` has no canonical integer model (a two-tensor layer, Choukroun §3.3), or ``None``."""
    try:
        check_convertible(prepared)
    except NoIntegerForm as exc:
        return exc.one_line()
    return None


__all__ = ["RUN_METHODS", "check_method", "not_convertible_reason", "quant_config",
           "record_method"]
