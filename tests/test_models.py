"""Model registry: names, resolutions and local float weights, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qat.errors import QatError
from qat.models import build_model, count_macs


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"arch": "resnet9000"}, r"model.arch: unknown value 'resnet9000' \(valid choices: inception_v3, mobilenet_v1"),
    ({"arch": "resnet18", "resolution": 16}, r"model.resolution: 16 is below 32"),
    ({"arch": "inception_v3", "resolution": 64}, r"model.resolution: 64 is below 75"),
    ({"arch": "resnet18", "width_mult": 0.5}, r"model.width_mult: resnet18 has no width multiplier"),
    ({"arch": "mobilenet_v2", "width_mult": -1}, r"model.width_mult: -1 is not a positive number"),
])
def test_bad_model_config_is_a_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(QatError, match=match):
        build_model(**{"num_classes": 10, "resolution": 224, **kwargs})


def test_local_weights_load_and_mismatch_is_reported(tmp_path: Path) -> None:
    source = build_model("mobilenet_v1", width_mult=0.25, num_classes=5, resolution=32)
    path = tmp_path / "float.pt"
    torch.save({"model": source.state_dict()}, path)
    loaded = build_model("mobilenet_v1", width_mult=0.25, num_classes=5, resolution=32, weights=str(path))
    pairs = zip(source.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(QatError, match="model.weights: .* does not fit this architecture"):
        build_model("mobilenet_v1", width_mult=0.5, num_classes=5, resolution=32, weights=str(path))
    with pytest.raises(QatError, match="model.weights: .* does not exist"):
        build_model("mobilenet_v1", width_mult=0.25, num_classes=5, resolution=32, weights=str(tmp_path / "no.pt"))


def test_mobilenet_v1_macs_follow_the_paper() -> None:
    # Howard et al. 2017 Table 1: 569 M mult-adds at 224 with alpha = 1
    macs = count_macs(build_model("mobilenet_v1", num_classes=1000, resolution=224), 224)
    assert 560e6 < macs < 580e6


def test_float_weights_from_a_qat_checkpoint_and_garbage(tmp_path) -> None:
    from qat.models.registry import load_float_weights
    from qat.train.checkpoint import save_checkpoint

    source = build_model("mobilenet_v1", width_mult=0.25, num_classes=10, resolution=32)
    save_checkpoint(tmp_path / "float.pt", {"model": source.state_dict()})
    target = build_model("mobilenet_v1", width_mult=0.25, num_classes=10, resolution=32)
    load_float_weights(target, str(tmp_path / "float.pt"))  # checksummed qat checkpoint
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(),
                                                  strict=True))
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(QatError, match=r"model.weights: .*junk.pt is not a readable state dict"):
        load_float_weights(target, str(tmp_path / "junk.pt"))


def test_bn_momentum_replaces_the_architectures_and_is_read_back() -> None:
    from qat.models.registry import bn_momenta

    assert bn_momenta(build_model("mobilenet_v3_small", num_classes=4, resolution=32)) == 0.01  # torchvision's
    model = build_model("mobilenet_v3_small", num_classes=4, resolution=32, bn_momentum=0.1)
    assert bn_momenta(model) == 0.1
    assert bn_momenta(build_model("mobilenet_v2", num_classes=4, resolution=32)) == 0.1
    with pytest.raises(QatError, match="model.bn_momentum: 0 is not in"):
        build_model("mobilenet_v2", num_classes=4, resolution=32, bn_momentum=0)
