"""The record's blocks about what ran on which machine, shared by classification and detection runs:
``target`` (the deployment target and what it changed, :mod:`qat.targets`), ``saturation`` (16-bit pair overflow of
the integer model, :mod:`qat.intmodel.saturation`) and ``quant`` (the recipe read back from the evaluated model,
:mod:`qat.quant.describe`). A run's config needs ``quant``, ``target`` and ``latency`` groups."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, replace
from typing import Any, TypeVar

import torch
from torch import nn

from qat import targets
from qat.engines import registry
from qat.errors import QatError
from qat.fidelity import primary_engine
from qat.intmodel.graph import IntModel
from qat.intmodel.saturation import diagnose
from qat.quant.describe import describe, differences

log = logging.getLogger("qat")
C = TypeVar("C")


def _primary(cfg: Any) -> str:
    return primary_engine(cfg.latency.engine, cfg.latency.backend, cfg.target.name)


def apply_target(cfg: C) -> tuple[C, targets.Plan]:
    """The run's config with the deployment target's grid (:func:`qat.targets.constrain`) and the plan for the
    record; says in the log which target, which recipe change, and which evaluated engine would saturate."""
    deployment, quant = targets.plan(cfg.target.name, cfg.quant, cfg.target.avx2_grid)
    log.info("[target] %s (%s)", deployment.target.name, deployment.why)
    for c in deployment.constraints:
        log.info("[target] %s: %s -> %s (%s)", c.key, c.config, c.applied, c.why)
    cfg = replace(cfg, quant=quant)
    if cfg.quant.precision != "float":
        deployment.warnings = targets.saturation_warnings(deployment, cfg.quant,
                                                          [_primary(cfg), *cfg.latency.eval_engines])
    for line in deployment.warnings:
        log.warning("[target] %s", line)
    return cfg, deployment


def saturation_block(int_model: IntModel, batches: Iterable[torch.Tensor], images: int, engines: list[str]
                     ) -> dict[str, Any]:
    """The record's ``saturation`` block: 16-bit pair overflow per layer on the first ``images`` images of ``batches``
    (:func:`qat.intmodel.saturation.diagnose`) and, per evaluated engine, whether it sums pairs on this host and
    so is predicted to leave the reference where layers are flagged."""
    taken: list[torch.Tensor] = []
    seen = 0
    for batch in batches:
        taken.append(batch[: images - seen])
        seen += taken[-1].shape[0]
        if seen >= images:
            break
    started = time.time()
    try:
        block = diagnose(int_model, taken).as_dict()
    except QatError as exc:  # the integer reference cannot run this model (e.g. an int32 bias out of range)
        log.warning("[saturation] not diagnosed: %s", exc)
        return {"status": "unsupported", "reason": str(exc), "images": 0}
    pairs_here = [e for e in engines if e in registry.ENGINES and targets.accumulates_in_pairs(e)]
    block["engines_summing_pairs_here"] = pairs_here
    block["predicted_to_disagree_here"] = pairs_here if block["overflowing_pair_sums"] else []
    block["diagnostic_s"] = time.time() - started
    log.info("[saturation] %.4f%% of 16-bit pair sums overflow on %d images (%d layer(s), worst %s); engines "
             "summing pairs here: %s", 100 * block["overflow_share"], block["images"], len(block["layers_flagged"]),
             block["worst_layer"], ", ".join(pairs_here) or "none")
    return block


def quant_block(prepared: nn.Module, cfg: Any, configured: Any, calibration_batches: int) -> dict[str, Any]:
    """The record's ``quant`` block read back from the evaluated model (:func:`qat.quant.describe.describe`),
    with the calibration that ran and where it departs from the configured recipe."""
    block = {**describe(prepared, "int8"), "calibration_batches": calibration_batches,
             "overrides": [asdict(o) for o in cfg.quant.overrides]}
    asked = asdict(configured)
    if asked.get("input_bits") is None:  # null: the input shares the activations' grid
        asked["input_bits"] = asked.get("act_bits")
    if asked.get("weight_step_init") is None:  # null: the weights' learned steps start as step_init says
        asked["weight_step_init"] = asked.get("step_init")
    block["config_differences"] = differences(block, asked)
    return block
