"""Image-classification data: the built-in demo dataset and the ImageFolder/ImageNet loaders."""

from qat.data.imagefolder import ClassificationData, build_classification_loaders, check_layout
from qat.data.synthetic import default_cache_dir, make_demo_dataset

__all__ = [
    "ClassificationData",
    "build_classification_loaders",
    "check_layout",
    "default_cache_dir",
    "make_demo_dataset",
]
