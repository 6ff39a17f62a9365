"""The simulated-vs-integer gap, measured on every engine that runs the canonical integer model (issue 4).

Each engine (the integer-only reference executor and the real int8 engines of :mod:`qat.engines.registry`)
evaluates the validation set; against the simulated model we record top-1 agreement and the logit difference
in output LSBs (one LSB = the output quantizer's scale). An engine that cannot run the model is recorded as
``unsupported`` with its one-line reason; nothing falls back to float.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from qat.engines import registry
from qat.errors import QatError, choice_error
from qat.intmodel import reference
from qat.intmodel.graph import IntModel
from qat.sweep_progress import duration
from qat.train.loop import progress, top1

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


def build_engine(name: str, int_model: IntModel, threads: int, device: torch.device | str = "cpu"
                 ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """The engine ``name`` built from ``int_model`` and its identity for the record (with the ``device`` it runs
    on). The integer-only reference runs on ``device``; every other engine (the pair16 emulation included) is
    CPU-only and runs on the CPU. Every engine takes and returns CPU tensors."""
    if name in REFERENCES:
        accumulation = "pair16" if name == REFERENCE_PAIR16 else "int32"
        device = torch.device(device) if accumulation == "int32" else torch.device("cpu")  # pair16: CPU-only
        executor = reference.build(int_model, rounding="single", accumulation=accumulation, device=device)
        info = {**reference.engine_info("single", accumulation), "device": str(device)}
        if device.type == "cpu":
            return executor, info
        return (lambda x: executor(x.to(device, non_blocking=True)).cpu()), info  # CPU in, CPU out like the others
    engine = registry.build_int(name, int_model, threads)
    info = {**registry.engine_info(name), "emulated_bits": bool(getattr(engine, "emulated_bits", False)),
            "device": "cpu"}
    return engine, info


EVAL_DEVICES = ("auto", "cpu", "cuda")


def eval_device(name: str, run_device: torch.device) -> torch.device:
    """The device of the reference's evaluation (``latency.eval_device``): ``auto`` is the run's device."""
    if name not in EVAL_DEVICES:
        raise choice_error("latency.eval_device", name, EVAL_DEVICES)
    if name == "auto":
        return run_device
    if name == "cuda" and not torch.cuda.is_available():
        raise QatError("latency.eval_device", "cuda, but no CUDA device is visible", "set latency.eval_device=cpu "
                       "or auto")
    return torch.device(name)


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


@dataclass
class BuiltEngine:
    """One engine of a shared evaluation pass: how to call it, its record identity, and the seconds it spent."""

    name: str
    run: Callable[[torch.Tensor], torch.Tensor]
    info: dict[str, Any]
    seconds: float = 0.0

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.get("device", "cpu"))


Feed = Callable[[BuiltEngine, Any], None]


def _unsupported(name: str, exc: QatError) -> dict[str, Any]:
    log.warning("[fidelity] %s cannot run this model: %s", name, exc.one_line())
    return {"status": "unsupported", "reason": exc.one_line()}


def _report(done: int, total: int, images: int, started: float, engines: list[BuiltEngine], desc: str) -> None:
    spent = time.perf_counter() - started
    left = spent / done * (total - done) if done else 0.0
    busy = sum(e.seconds for e in engines) or 1.0
    shares = ", ".join(f"{e.name} {100 * e.seconds / busy:.0f}%" for e in engines)
    log.info("[%s] %d/%d batches (%d images) in %s, %.1f images/s; about %s left (%s)", desc, done, total, images,
             duration(spent), images / max(spent, 1e-9), duration(left), shares)


def shared_pass(loader: Iterable[Any], engines: list[BuiltEngine], feed: Feed, primary: str,
                unsupported: dict[str, dict[str, Any]], desc: str = "fidelity", every_s: float = 30.0) -> None:
    """One pass over ``loader`` that hands each batch, decoded once, to ``feed(engine, batch)`` for every engine
    (each engine's time is its own ``seconds``). An engine other than ``primary`` that raises a
    :class:`QatError` leaves the pass as ``unsupported`` with its one line. Progress: a bar on a terminal, and a
    line with the images done, the rate and the time left every ``every_s`` seconds and at the end."""
    total = len(loader) if isinstance(loader, Sized) else 0
    started = last = time.perf_counter()
    done = images = 0
    for batch in progress(loader, total, desc):
        for engine in list(engines):
            t = time.perf_counter()
            try:
                feed(engine, batch)
            except QatError as exc:
                if engine.name == primary:
                    raise
                unsupported[engine.name] = _unsupported(engine.name, exc)
                engines.remove(engine)
                continue
            engine.seconds += time.perf_counter() - t
        done += 1
        images += _batch_size(batch)
        if time.perf_counter() - last >= every_s or done == total:
            last = time.perf_counter()
            _report(done, total, images, started, engines, desc)


def _batch_size(batch: Any) -> int:
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(images)


def on_engines(int_model: IntModel, names: Sequence[str], primary: str, threads: int, loader: Iterable[Any],
               feed: Feed, finish: Callable[[BuiltEngine], dict[str, Any]], device: torch.device | str = "cpu"
               ) -> dict[str, Any]:
    """Every engine of ``names`` built from ``int_model`` (``primary`` first; it must run), fed by one
    :func:`shared_pass` over ``loader``; ``finish(engine)`` then gives each engine's fields. Returns ``{name:
    {"status": "ok", engine info (with its device), "build_s", finish's fields, "eval_s"}}``; an engine that cannot
    build or run the model is ``{"status": "unsupported", "reason": <one line>}``."""
    built: list[BuiltEngine] = []
    unsupported: dict[str, dict[str, Any]] = {}
    order = list(dict.fromkeys([primary, *names]))
    for name in order:
        started = time.perf_counter()
        try:
            run, info = build_engine(name, int_model, threads, device)
        except QatError as exc:
            if name == primary:
                raise
            unsupported[name] = _unsupported(name, exc)
            continue
        built.append(BuiltEngine(name, run, {**info, "build_s": time.perf_counter() - started}))
    cpu_only = [e.name for e in built if e.device.type != torch.device(device).type]
    if cpu_only:
        log.info("[fidelity] on %s; CPU-only engines: %s", device, ", ".join(cpu_only))
    shared_pass(loader, built, feed, primary, unsupported)
    engines: dict[str, Any] = {}
    for engine in built:
        engines[engine.name] = {"status": "ok", **engine.info, **finish(engine), "eval_s": engine.seconds}
    return {name: engines.get(name, unsupported.get(name)) for name in order}


def evaluate_engines(int_model: IntModel, loader: DataLoader, sim_logits: torch.Tensor, sim_pred: torch.Tensor,
                     targets: torch.Tensor, names: Sequence[str], primary: str, threads: int = 1,
                     device: torch.device | str = "cpu") -> tuple[dict[str, Any], torch.Tensor]:
    """Evaluate ``int_model`` on every engine of ``names`` (``primary`` first; it must run) in one pass over
    ``loader`` (the reference executors on ``device``).

    Returns the fidelity block of the record and the primary engine's logits.
    """
    lsb = output_lsb(int_model)
    suffix = "_lsb" if lsb is not None else ""  # differences in output LSBs, or in real units without an LSB
    batches: dict[str, list[torch.Tensor]] = {}

    def feed(engine: BuiltEngine, batch: Any) -> None:
        logits = engine.run(batch[0]).float()  # an engine that fails here leaves the pass (unsupported) with no entry
        batches.setdefault(engine.name, []).append(logits)

    def finish(engine: BuiltEngine) -> dict[str, Any]:
        logits = torch.cat(batches[engine.name])
        fields = compare(sim_logits, sim_pred, logits, targets, lsb)
        unit = "LSB" if lsb is not None else "(real units: no output quantizer)"
        log.info("[fidelity] %-20s top-1 %.2f%%  agreement with simulated %.2f%%  max |Δ| %.3g %s  (%s, %s)",
                 engine.name, fields["top1"], fields["agreement_with_sim"], fields[f"logit_max_abs_diff{suffix}"],
                 unit, engine.device, duration(engine.seconds))
        return fields

    engines = on_engines(int_model, names, primary, threads, loader, feed, finish, device)
    primary_logits = torch.cat(batches[primary])
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
