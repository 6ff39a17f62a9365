"""Step-driven QAT schedule: every switch of Jacob §3.1 / App. C and whitepaper §3.2 as an explicit step.

* ``weight_quant_delay``: steps before weights are fake-quantized.
* ``act_quant_delay``: steps before activations are fake-quantized (Jacob: 500k steps on ImageNet); their
  ranges are still estimated during the delay so quantization starts from a good range.
* ``bn_freeze_step``: from this step, folded BN uses running statistics (whitepaper §3.2.2; Jacob App. C).
  The default, 0, freezes it from the first fine-tuning step: fine-tuning starts from trained float weights, whose
  running statistics are better estimates than the batch moments of a few images (README "Small batches and batch
  norm": at 16 and at 64 images per batch, in every fold mode, on the demo), and the Jacob and whitepaper folds
  are then one convolution per layer. ``None`` keeps batch statistics throughout (training from scratch).
* ``range_freeze_step``: from this step, activation and weight ranges stop updating.

The switches are a pure function of the global step, so a resumed run (step restored from a checkpoint)
is in exactly the state of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qat.errors import QatError
from qat.quant.fake_quant import FakeQuantize
from qat.quant.modules import QConvBnAct, QLinear


@dataclass
class QuantSchedule:
    weight_quant_delay: int = 0
    act_quant_delay: int = 0
    bn_freeze_step: int | None = 0
    range_freeze_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("weight_quant_delay", "act_quant_delay", "bn_freeze_step", "range_freeze_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise QatError(f"schedule.{name}", f"{value} is negative", "use a step count >= 0 (or null)")

    def state_at(self, step: int) -> dict[str, bool]:
        """The switches in force at global ``step`` (0-based: the step about to run)."""
        return {
            "weights_quantized": step >= self.weight_quant_delay,
            "acts_quantized": step >= self.act_quant_delay,
            "bn_frozen": self.bn_freeze_step is not None and step >= self.bn_freeze_step,
            "ranges_frozen": self.range_freeze_step is not None and step >= self.range_freeze_step,
        }

    def apply(self, model: nn.Module, step: int) -> dict[str, bool]:
        """Set every quantizer and folded-BN module of ``model`` to the state at ``step``."""
        state = self.state_at(step)
        weight_fqs = set()
        for module in model.modules():
            if isinstance(module, QConvBnAct | QLinear):
                weight_fqs.add(id(module.weight_fq))
                module.weight_fq.quantizing = state["weights_quantized"]
                module.weight_fq.observing = not state["ranges_frozen"]
            if isinstance(module, QConvBnAct):
                module.bn_frozen = state["bn_frozen"]
        for module in model.modules():
            if isinstance(module, FakeQuantize) and id(module) not in weight_fqs:
                module.quantizing = state["acts_quantized"]
                module.observing = not state["ranges_frozen"]
        return state


def batch_norms_without_statistics(model: nn.Module) -> list[str]:
    """Names of ``model``'s folded batch norms whose running statistics are still their initial values (mean 0,
    variance 1): they never saw data. Folded with those frozen statistics (Jacob eq. 14 with the running moments)
    an untrained layer's outputs leave its activation range and the gradients vanish (measured on SSDLite
    MobileNet v2 with untrained heads: 240 of its 252 parameters got exactly zero gradient)."""
    names = []
    for name, module in model.named_modules():
        bn = module.bn if isinstance(module, QConvBnAct) else None
        if bn is not None and bn.track_running_stats and not bn.running_mean.any() and (bn.running_var == 1).all():
            names.append(name)
    return names
