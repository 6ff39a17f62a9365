"""The simulated-vs-integer gap, measured on every engine that runs the canonical integer model (issue 4).

Each engine (the integer-only reference executor and the real int8 engines of :mod:`qat.engines.registry`)
evaluates the validation set; against the simulated model we record top-1 agreement and the logit difference
in output LSBs (one LSB = the output quantizer's scale). An engine that cannot run the model is recorded as
``unsupported`` with its one-line reason; nothing falls back to float.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from qat.engines import registry
from qat.errors import QatError
from qat.intmodel import reference
from qat.intmodel.graph import IntModel
from qat.train.loop import predict, top1

log = logging.getLogger("qat")

REFERENCE = "reference"  # the integer-only executor (gemmlowp/TFLite arithmetic, single rounding)
REFERENCE_PAIR16 = "reference_pair16"  # the same, emulating x86 without VNNI (16-bit pair sums, saturating)
REFERENCES = (REFERENCE, REFERENCE_PAIR16)


def output_lsb(int_model: IntModel) -> float | None:
    """Scale of the quantized logits: one output LSB in real units; ``None`` when the logits have no output
    quantizer (the graph does not end in a dequantize of a quantized tensor), so there is no LSB to count in."""
    last = int_model.nodes[-1] if int_model.nodes else None
    if last is None or last.op != "dequantize" or not last.inputs:
        return None
    source = next((n for n in int_model.nodes if n.name == last.inputs[0]), None)
    return float(source.out.scale) if source is not None and source.out is not None else None


def build_engine(name: str, int_model: IntModel, threads: int) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                         dict[str, Any]]:
    """The engine ``name`` built from ``int_model`` and its identity for the record."""
    if name in REFERENCES:
        accumulation = "pair16" if name == REFERENCE_PAIR16 else "int32"
        return (reference.build(int_model, rounding="single", accumulation=accumulation),
                reference.engine_info("single", accumulation))
    engine = registry.build_int(name, int_model, threads)
    info = {**registry.engine_info(name), "emulated_bits": bool(getattr(engine, "emulated_bits", False))}
    return engine, info


def check_engine_names(names: Sequence[str], key: str = "latency.eval_engines") -> None:
    for name in names:
        if name not in REFERENCES:
            try:
                registry.entry(name)
            except QatError as exc:
                raise QatError(key, f"unknown engine {name!r}", exc.fix) from exc


def tie_aware_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Top-1 agreement of two logit tensors in percent, where a row whose logits tie at the top agrees when the
    other's top-1 is one of the tied classes: quantized logits tie exactly (one output LSB apart is the grid), and
    ``argmax`` then picks the first class, an arbitrary choice that a 1-LSB difference elsewhere can flip."""
    a_in_b = b.gather(1, a.argmax(1, keepdim=True)).squeeze(1) == b.max(1).values
    b_in_a = a.gather(1, b.argmax(1, keepdim=True)).squeeze(1) == a.max(1).values
    return 100.0 * (a_in_b | b_in_a).float().mean().item()


def compare(sim_logits: torch.Tensor, sim_pred: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
            lsb: float | None) -> dict[str, Any]:
    """Top-1, agreement with the simulated model, and logit differences in output LSBs
    (``logit_*_abs_diff_lsb``, ``logits_within_1lsb``, ``logit_diff_unit: "lsb"``); with no output LSB
    (``lsb=None``) the differences are in real units under names without ``_lsb``
    (``logit_*_abs_diff``, ``logit_diff_unit: "real"``) and there is no within-1-LSB share."""
    pred = logits.argmax(1)
    fields: dict[str, Any] = {"top1": top1(pred, targets), "agreement_with_sim": top1(sim_pred, pred),
                              "agreement_with_sim_tie_aware": tie_aware_agreement(sim_logits, logits)}
    diff = (sim_logits - logits).abs()
    if lsb is None:
        return {**fields, "logit_diff_unit": "real", "logit_max_abs_diff": float(diff.max()),
                "logit_mean_abs_diff": float(diff.mean())}
    diff = diff / lsb
    return {**fields, "logit_diff_unit": "lsb", "logit_max_abs_diff_lsb": float(diff.max()),
            "logit_mean_abs_diff_lsb": float(diff.mean()),
            "logits_within_1lsb": float((diff <= 1 + 1e-3).float().mean() * 100)}


def primary_engine(engine: str, backend: str, target: str = "auto") -> str:
    """The registry name of a run's primary int8 engine (``latency.engine``, ``latency.backend``); ``auto`` is
    the deployment target's first engine (:mod:`qat.targets`)."""
    if engine == "auto":
        from qat.targets import resolve

        return resolve(target)[0].engines[0]
    return f"torch_native_{backend}" if engine == "torch_native" else engine


def on_engines(int_model: IntModel, names: Sequence[str], primary: str, threads: int,
               run: Callable[[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, Any]]) -> dict[str, Any]:
    """``run(name, engine)`` on every engine of ``names`` built from ``int_model`` (``primary`` first; it must
    run). Returns ``{name: {"status": "ok", engine info, run's fields, "eval_s"}}``; an engine that cannot run
    the model is ``{"status": "unsupported", "reason": <one line>}``."""
    engines: dict[str, Any] = {}
    for name in dict.fromkeys([primary, *names]):
        started = time.time()
        try:
            engine, info = build_engine(name, int_model, threads)
            fields = run(name, engine)
        except QatError as exc:
            if name == primary:
                raise
            engines[name] = {"status": "unsupported", "reason": exc.one_line()}
            log.warning("[fidelity] %s cannot run this model: %s", name, exc.one_line())
            continue
        engines[name] = {"status": "ok", **info, **fields, "eval_s": time.time() - started}
    return engines


def evaluate_engines(int_model: IntModel, loader: DataLoader, sim_logits: torch.Tensor, sim_pred: torch.Tensor,
                     targets: torch.Tensor, names: Sequence[str], primary: str, threads: int = 1
                     ) -> tuple[dict[str, Any], torch.Tensor]:
    """Evaluate ``int_model`` on every engine of ``names`` (``primary`` first; it must run).

    Returns the fidelity block of the record and the primary engine's logits.
    """
    lsb = output_lsb(int_model)
    suffix = "_lsb" if lsb is not None else ""  # differences in output LSBs, or in real units without an LSB
    logits_of: dict[str, torch.Tensor] = {}

    def run(name: str, engine: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        logits_of[name], _, _ = predict(engine, loader, desc=f"eval {name}")
        fields = compare(sim_logits, sim_pred, logits_of[name], targets, lsb)
        unit = "LSB" if lsb is not None else "(real units: no output quantizer)"
        log.info("[fidelity] %-20s top-1 %.2f%%  agreement with simulated %.2f%%  max |Δ| %.3g %s", name,
                 fields["top1"], fields["agreement_with_sim"], fields[f"logit_max_abs_diff{suffix}"], unit)
        return fields

    engines = on_engines(int_model, names, primary, threads, run)
    primary_logits = logits_of[primary]
    main = engines[primary]
    block = {"primary_engine": primary, "output_lsb": lsb, "engines": engines,
             # the primary engine's numbers at the top level, as before; "_lsb" only when they are in LSBs
             "sim_vs_int_top1_agreement": main["agreement_with_sim"],
             "logit_diff_unit": main["logit_diff_unit"],
             f"logit_max_abs_diff{suffix}": main[f"logit_max_abs_diff{suffix}"],
             f"logit_mean_abs_diff{suffix}": main[f"logit_mean_abs_diff{suffix}"],
             "engine_8bit_container": main.get("emulated_bits", False),
             "min_agreement_with_sim": min(e["agreement_with_sim"] for e in engines.values() if e["status"] == "ok"),
             "min_agreement_with_sim_tie_aware": min(e["agreement_with_sim_tie_aware"] for e in engines.values()
                                                     if e["status"] == "ok")}
    return block, primary_logits
