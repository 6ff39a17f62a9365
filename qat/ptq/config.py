"""The PTQ recipe as a plain dataclass (plain types and defaults: registrable in Hydra's ConfigStore)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qat.errors import QatError, choice_error

CALIBRATION_OBSERVERS = ("minmax", "mse", "percentile")
BUDGET_METRICS = ("size", "bops")


@dataclass
class PtqConfig:
    """Which post-training methods run, in the order of :func:`qat.ptq.apply.run_ptq`; all are combinable.

    ``calibration_observer``: activation ranges by running min/max, percentile (whitepaper §3.1) or
    MSE-optimal clipping (Choukroun §3.1, weights then per channel too). ``two_tensor_threshold``: layers whose
    relative weight error ||W - Q(W)||²/||W||² exceeds it get a second, residual tensor (Choukroun §3.3);
    null: off. ``adaquant``: sequential AdaQuant (Hubara §3-4) with Adam learning rates for the weights,
    the bias and the step sizes; ``adaquant_learn_act_step``: besides the weight step Δw, also learn the step Δx
    of each layer's input quantizer (Hubara eq. 2: argmin over Δw, Δx and V; at ``adaquant_lr_scale``), false:
    Δx stays as calibrated. ``bit_allocation_budget``: per-layer weight bits from
    ``bit_choices`` under this fraction of the all-widest cost (``size``: weight bits; ``bops``: MACs × weight
    bits × activation bits), by integer programming (Hubara §4.1); null: off.
    """

    calibration_observer: str = "minmax"
    calibration_batches: int = 4  # batches of the calibration loader used by every method
    percentile: float = 99.99
    two_tensor_threshold: float | None = None
    adaquant: bool = False
    adaquant_iterations: int = 100
    adaquant_batch: int = 32
    # Hubara et al.'s reference code uses 1e-5 (weights) and 1e-3 (bias, steps) with ImageNet-sized
    # calibration sets; 10x larger rates gave the best demo top-1 with 100 iterations (scripts/bench/ptq.py)
    adaquant_lr_weight: float = 1e-4
    adaquant_lr_bias: float = 1e-2
    adaquant_lr_scale: float = 1e-2  # on the step-size factors (1.0 = calibrated step), Δw and Δx
    adaquant_learn_act_step: bool = True  # Hubara eq. 2 learns Δx too; false: activation steps as calibrated
    bn_reestimation: bool = False
    bias_correction: bool = False
    bit_allocation_budget: float | None = None
    bit_allocation_metric: str = "size"
    bit_choices: list[int] = field(default_factory=lambda: [4, 8])
    seed: int = 0

    def __post_init__(self) -> None:
        if self.calibration_observer not in CALIBRATION_OBSERVERS:
            raise choice_error("ptq.calibration_observer", self.calibration_observer, CALIBRATION_OBSERVERS)
        if self.bit_allocation_metric not in BUDGET_METRICS:
            raise choice_error("ptq.bit_allocation_metric", self.bit_allocation_metric, BUDGET_METRICS)
        for key in ("calibration_batches", "adaquant_iterations", "adaquant_batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise QatError(f"ptq.{key}", f"{value!r} is not a positive integer", "use an integer >= 1")
        if not isinstance(self.adaquant_learn_act_step, bool):
            raise QatError("ptq.adaquant_learn_act_step", f"{self.adaquant_learn_act_step!r} is not a boolean",
                           "use true or false")
        for key in ("adaquant_lr_weight", "adaquant_lr_bias", "adaquant_lr_scale"):
            if not getattr(self, key) >= 0.0:
                raise QatError(f"ptq.{key}", f"{getattr(self, key)!r} is negative", "use a learning rate >= 0")
        if not 50.0 < self.percentile <= 100.0:
            raise QatError("ptq.percentile", f"{self.percentile} is outside (50, 100]", "use e.g. 99.99")
        if self.two_tensor_threshold is not None and not self.two_tensor_threshold > 0.0:
            raise QatError("ptq.two_tensor_threshold", f"{self.two_tensor_threshold} is not positive",
                           "use a relative weight MSE such as 0.01, or null to turn it off")
        if self.bit_allocation_budget is not None and not 0.0 < self.bit_allocation_budget <= 1.0:
            raise QatError("ptq.bit_allocation_budget", f"{self.bit_allocation_budget} is outside (0, 1]",
                           "give the fraction of the all-widest cost, e.g. 0.75, or null to turn it off")
        self.bit_choices = list(self.bit_choices)
        if not self.bit_choices or len(set(self.bit_choices)) != len(self.bit_choices):
            raise QatError("ptq.bit_choices", f"{self.bit_choices} is empty or repeats a width",
                           "list distinct bit widths, e.g. [4, 8]")
        for bits in self.bit_choices:
            if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
                raise QatError("ptq.bit_choices", f"{bits!r} is outside [2, 16]", "use integer widths from 2 to 16")
