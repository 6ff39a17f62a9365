"""One entry point for post-training quantization: ``run_ptq(prepared, calibration_loader, PtqConfig)``.

Order (each step optional, all combinable): bit allocation (Hubara §4.1) → range calibration (min/max,
percentile or MSE, Choukroun §3.1) → two-tensor layers (Choukroun §3.3) → sequential AdaQuant (Hubara §3) →
BN re-estimation (Hubara §4.2) → bias correction (Nagel/Banner, Hubara §4). The model is changed in place and
left in eval mode with every range frozen, ready for evaluation and (without two-tensor layers) conversion.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from torch import fx

from qat.errors import QatError
from qat.ptq.adaquant import run_adaquant
from qat.ptq.bias_correction import run_bias_correction
from qat.ptq.bit_allocation import apply_bit_allocation
from qat.ptq.bn_reestimation import run_bn_reestimation
from qat.ptq.calibration import calibrate
from qat.ptq.config import PtqConfig
from qat.ptq.layers import float_reference, load_images, quantized_layers
from qat.ptq.two_tensor import apply_two_tensor


def methods_tag(methods: PtqConfig) -> str:
    """Short name of the combination, e.g. ``mse+two_tensor`` or ``minmax+adaquant+bn+bias``."""
    parts = [methods.calibration_observer]
    if methods.bit_allocation_budget is not None:
        parts.insert(0, f"bits{methods.bit_allocation_metric}{methods.bit_allocation_budget:g}")
    for flag, name in ((methods.two_tensor_threshold is not None, "two_tensor"), (methods.adaquant, "adaquant"),
                       (methods.bn_reestimation, "bn"), (methods.bias_correction, "bias")):
        if flag:
            parts.append(name)
    return "+".join(parts)


def run_ptq(prepared: fx.GraphModule, calibration_loader: Any, methods: PtqConfig) -> dict[str, Any]:
    """Apply ``methods`` to ``prepared`` (from :func:`qat.quant.prepare.prepare`) in place; return the report
    (JSON-serializable: per-step details and timings) for the run record."""
    if not isinstance(methods, PtqConfig):
        raise QatError("ptq", f"expected a PtqConfig, got {type(methods).__name__}", "build PtqConfig(...)")
    if not quantized_layers(prepared):
        raise QatError("ptq", "the model has no quantized conv or linear layer", "prepare it with quant != float")
    started = time.time()
    images = load_images(calibration_loader, methods.calibration_batches)
    report: dict[str, Any] = {"method": methods_tag(methods), "config": asdict(methods),
                              "calibration_images": int(images.shape[0])}
    timing: dict[str, float] = {}
    reference = float_reference(prepared)  # the float network, before anything changes

    def step(name: str, fn: Any) -> None:
        t = time.time()
        report[name] = fn()
        timing[f"{name}_s"] = time.time() - t

    if methods.bit_allocation_budget is not None:
        step("bit_allocation", lambda: apply_bit_allocation(
            prepared, images, budget_fraction=methods.bit_allocation_budget, bit_choices=methods.bit_choices,
            metric=methods.bit_allocation_metric,
            weight_observer="mse" if methods.calibration_observer == "mse" else "current"))
    step("calibration", lambda: calibrate(prepared, images, methods.calibration_observer, methods.percentile))
    if methods.two_tensor_threshold is not None:
        step("two_tensor", lambda: apply_two_tensor(prepared, methods.two_tensor_threshold, images[:1]))
    if methods.adaquant:
        step("adaquant", lambda: run_adaquant(
            prepared, images, iterations=methods.adaquant_iterations, batch_size=methods.adaquant_batch,
            lr_weight=methods.adaquant_lr_weight, lr_bias=methods.adaquant_lr_bias,
            lr_scale=methods.adaquant_lr_scale, seed=methods.seed, reference=reference,
            learn_act_step=methods.adaquant_learn_act_step))
    if methods.bn_reestimation:
        step("bn_reestimation", lambda: run_bn_reestimation(prepared, images))
    if methods.bias_correction:
        step("bias_correction", lambda: run_bias_correction(prepared, images, reference=reference))
    prepared.eval()
    timing["total_s"] = time.time() - started
    report["timing"] = timing
    return report
