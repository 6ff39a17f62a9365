"""Model registry: torchvision classifiers and our MobileNet v1 by name."""

from qat.models.registry import MODELS, build_model, count_macs

__all__ = ["MODELS", "build_model", "count_macs"]
