"""The quantization recipe as a plain dataclass (mirrored by the Hydra ``quant/`` group)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qat.errors import QatError, choice_error
from qat.quant.modules import BN_FOLD_MODES
from qat.quant.observers import OBSERVER_NAMES
from qat.quant.scheme import QuantSpec


@dataclass
class LayerOverride:
    """Per-layer change selected by an fnmatch pattern over module names (e.g. ``features.0.*``)."""

    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None
    keep_float: bool = False


@dataclass
class QuantConfig:
    """Weights and activations recipe (whitepaper §2-3; Jacob §2-3).

    Defaults are the demo recipe: weights 8-bit symmetric per-channel narrow-range, activations 8-bit
    asymmetric per-tensor with EMA ranges, Jacob eq. 14 batch-norm folding.
    """

    weight_bits: int = 8
    act_bits: int = 8
    weight_per_channel: bool = True
    weight_ch_axis: int = 0  # axis of the per-channel weight grids (0 = output channels, whitepaper §2.4)
    weight_symmetric: bool = True
    weight_narrow_range: bool = True
    act_symmetric: bool = False
    act_observer: str = "ema"
    weight_observer: str = "current"
    ema_decay: float = 0.99
    percentile: float = 99.99
    bn_fold: str = "whitepaper"  # the presets' default (configs/quant/w8a8.yaml says why)
    step_lr_scale: float = 1.0  # learning-rate multiplier of learned step sizes (lsq/lsq_plus), no weight decay
    step_init: str = "minmax"  # initial learned step sizes: minmax | mse (LSQ+ §3.3) | lsq (Esser: 2·mean|v|/sqrt(Q_P))
    weight_step_init: str | None = None  # the weights' own (None: step_init); activations take step_init
    step_domain: str = "linear"  # learn S itself (Esser) | log: learn ln S (TQT; positive, ratio updates)
    activation: str | None = None  # force "relu" or "relu6" in every fused activation (Jacob Table 4.3)
    input_bits: int | None = None  # the model input's grid (None: act_bits); Esser et al. 2020 §3 keep it at 8
    overrides: list[LayerOverride] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.bn_fold not in BN_FOLD_MODES:
            raise choice_error("quant.bn_fold", self.bn_fold, BN_FOLD_MODES)
        for key in ("act_observer", "weight_observer"):
            if getattr(self, key) not in OBSERVER_NAMES:
                raise choice_error(f"quant.{key}", getattr(self, key), OBSERVER_NAMES)
        if self.weight_observer == "lsq_plus":
            raise QatError("quant.weight_observer", "lsq_plus learns an offset, which symmetric weight grids do not "
                           "have", "use quant.weight_observer=lsq (LSQ+ is for activations)")
        if self.weight_observer == "lsq" and not self.weight_symmetric:
            raise QatError("quant.weight_observer", "lsq for weights needs a symmetric grid",
                           "set quant.weight_symmetric=true, or use another weight observer")
        for key in ("step_init", "weight_step_init"):
            value = getattr(self, key)
            if value not in ("mse", "minmax", "lsq") and (key == "step_init" or value is not None):
                raise choice_error(f"quant.{key}", value, ["mse", "minmax", "lsq"])
        if self.step_domain not in ("linear", "log"):
            raise choice_error("quant.step_domain", self.step_domain, ["linear", "log"])
        if self.step_lr_scale <= 0:
            raise QatError("quant.step_lr_scale", f"{self.step_lr_scale} is not positive", "use e.g. 1.0 or 0.1")
        if self.activation not in (None, "relu", "relu6"):
            raise choice_error("quant.activation", self.activation, ["relu", "relu6"])
        if not 0.0 <= self.ema_decay < 1.0:
            raise QatError("quant.ema_decay", f"{self.ema_decay} is outside [0, 1)", "use e.g. 0.99 or 0.999")
        if self.input_bits is not None and not 2 <= self.input_bits <= 16:
            raise QatError("quant.input_bits", f"{self.input_bits} is outside [2, 16]",
                           "choose an integer bit width from 2 to 16, or null for quant.act_bits")
        self.overrides = [o if isinstance(o, LayerOverride) else LayerOverride(**o) for o in self.overrides]
        self.weight_spec()
        self.act_spec()

    def weight_spec(self, bits: int | None = None) -> QuantSpec:
        return QuantSpec(bits=bits or self.weight_bits, signed=True, symmetric=self.weight_symmetric,
                         narrow_range=self.weight_narrow_range, per_channel=self.weight_per_channel,
                         ch_axis=self.weight_ch_axis, key="quant.weight_{}")

    def act_spec(self, bits: int | None = None) -> QuantSpec:
        signed = self.act_symmetric
        return QuantSpec(bits=bits or self.act_bits, signed=signed, symmetric=self.act_symmetric,
                         key="quant.act_{}")

    def check_bits(self) -> None:
        for o in self.overrides:
            for name in ("weight_bits", "act_bits"):
                value = getattr(o, name)
                if value is not None and not 2 <= value <= 16:
                    raise QatError(f"quant.overrides[{o.pattern}].{name}", f"{value} is outside [2, 16]",
                                   "choose an integer bit width from 2 to 16")
