"""torchvision's pretrained weights by name (issue 16 item 10): ``model.weights=IMAGENET1K_V2`` / ``DEFAULT`` /
``IMAGENET1K_V1`` read torchvision's own cache, ``$TORCH_HOME/hub/checkpoints/<basename of Weights.url>``; with
the file missing and no network, one line names the full path to put it at and the URL it comes from.

The network is never used: ``torch.hub.download_url_to_file`` is replaced by a stand-in that fails as offline
(or, in one test, writes the file as a download would), and records what it was asked for.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from qat.detection.models import build_detector
from qat.errors import QatError
from qat.models import build_model

RESNET18 = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


class Downloads:
    """Stand-in for ``torch.hub.download_url_to_file``: offline unless given ``serve``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.serve: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        self.calls.append((url, dst))
        if url not in self.serve:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        torch.save(self.serve[url], dst)


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Downloads:
    stand_in = Downloads()
    monkeypatch.setattr(torch.hub, "download_url_to_file", stand_in)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return stand_in


def plant(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    """``state`` where torchvision's cache keeps the file ``name`` (TORCH_HOME is tmp_path/torch)."""
    path = tmp_path / "torch" / "hub" / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("arch", "name", "file"), [
    ("resnet18", "DEFAULT", "resnet18-f37072fd.pth"),
    ("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "resnet18-f37072fd.pth"),
    ("mobilenet_v2", "IMAGENET1K_V2", "mobilenet_v2-7ebf99e0.pth"),
    ("mobilenet_v2", "IMAGENET1K_V1", "mobilenet_v2-b0353104.pth"),
    ("mobilenet_v3_small", "DEFAULT", "mobilenet_v3_small-047dcff4.pth"),
])
def test_named_weights_load_from_torchvisions_cache_without_network(arch: str, name: str, file: str,
                                                                    tmp_path: Path, downloads: Downloads) -> None:
    torch.manual_seed(0)
    source = getattr(torchvision.models, arch)().state_dict()  # torchvision's architecture, 1000 classes
    plant(tmp_path, file, source)
    model = build_model(arch, num_classes=1000, resolution=32, weights=name)
    assert equal(model.state_dict(), source)
    assert downloads.calls == []


def test_a_missing_file_is_downloaded_into_the_cache_where_the_network_allows(tmp_path: Path,
                                                                             downloads: Downloads) -> None:
    source = torchvision.models.resnet18().state_dict()
    downloads.serve[RESNET18] = source
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    model = build_model("resnet18", num_classes=1000, resolution=32, weights="DEFAULT")
    assert downloads.calls == [(RESNET18, str(cached))] and cached.is_file()
    assert equal(model.state_dict(), source)
    build_model("resnet18", num_classes=1000, resolution=32, weights="IMAGENET1K_V1")
    assert len(downloads.calls) == 1  # the second time from the cache


def test_offline_with_an_empty_cache_is_one_line_naming_the_path_and_url(tmp_path: Path,
                                                                        downloads: Downloads) -> None:
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(QatError) as caught:
        build_model("resnet18", num_classes=1000, resolution=32, weights="DEFAULT")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"model.weights: torchvision's ResNet18_Weights.IMAGENET1K_V1 weights are not in "
                              f"{cached} and could not be downloaded (")
    assert message.endswith(f"(download {RESNET18} and put it at {cached})")
    assert downloads.calls == [(RESNET18, str(cached))] and not cached.exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"arch": "mobilenet_v1", "weights": "IMAGENET1K_V1"},
     r"^model.weights: mobilenet_v1 is qat's own network: torchvision has no pretrained IMAGENET1K_V1 weights"),
    ({"arch": "mobilenet_v2", "width_mult": 0.5, "weights": "DEFAULT"},
     r"^model.weights: torchvision's mobilenet_v2 weights are for model.width_mult=1.0, not 0.5 \(set model"),
    ({"arch": "mobilenet_v3_large", "width_mult": 0.75, "weights": "IMAGENET1K_V2"},
     r"^model.weights: torchvision's mobilenet_v3_large weights are for model.width_mult=1.0, not 0.75"),
    ({"arch": "resnet18", "weights": "IMAGENET1K_V2"},
     r"^model.weights: torchvision has no IMAGENET1K_V2 weights for resnet18 \(valid names: IMAGENET1K_V1, DEFAULT"),
    ({"arch": "resnet18", "weights": "ResNet50_Weights.IMAGENET1K_V1"},
     r"^model.weights: torchvision has no ResNet50_Weights.IMAGENET1K_V1 weights for resnet18"),
    ({"arch": "resnet18", "weights": "DEFAULT", "num_classes": 10},
     r"^model.weights: torchvision's ResNet18_Weights.IMAGENET1K_V1 weights classify 1000 ImageNet classes, the "
     r"dataset has 10"),
])
def test_names_torchvision_has_no_file_for_are_one_line(kwargs: dict, match: str, downloads: Downloads) -> None:
    with pytest.raises(QatError, match=match) as caught:
        build_model(**{"num_classes": 1000, "resolution": 32, **kwargs})
    assert "\n" not in str(caught.value) and downloads.calls == []


def test_inception_weights_keep_torchvisions_function(tmp_path: Path, downloads: Downloads) -> None:
    """torchvision's Inception v3 weights come with an auxiliary classifier and ``transform_input``; qat's
    Inception v3 has neither, and with the weights computes what torchvision's model computes."""
    torch.manual_seed(0)
    reference = torchvision.models.inception_v3(init_weights=True, aux_logits=True, transform_input=True)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so the folded mean matters
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    plant(tmp_path, "inception_v3_google-0cc3c7bd.pth", reference.state_dict())
    model = build_model("inception_v3", num_classes=1000, resolution=75, weights="DEFAULT").eval()
    images = torch.randn(2, 3, 75, 75)
    with torch.no_grad():
        expected, got = reference.eval()(images), model(images)
        reference.transform_input = False
        unfolded = reference(images)  # what the weights give without the input re-normalisation
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 1e-5 * scale
    assert (unfolded - expected).abs().max() > 1e-2 * scale


def test_detector_backbone_by_name(tmp_path: Path, downloads: Downloads) -> None:
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v3_large().state_dict()  # full tail, as torchvision trained it
    plant(tmp_path, "mobilenet_v3_large-5c1a4163.pth", source)
    detector = build_detector("mobilenet_v3_large", num_categories=2, resolution=64,
                              backbone_weights="IMAGENET1K_V2")
    last = source["features.16.0.weight"]  # the 960-channel last layer, 480 wide with the reduced tail
    assert any(v.shape == last.shape and torch.equal(v, last) for v in detector.state_dict().values())
    with pytest.raises(QatError, match=r"^model.weights: IMAGENET1K_V2 names torchvision classification weights, "
                                       r"not a detector's \(give them as model.backbone_weights=IMAGENET1K_V2"):
        build_detector("mobilenet_v3_large", num_categories=2, resolution=64, weights="IMAGENET1K_V2")
    with pytest.raises(QatError, match=r"^model.backbone_weights: mobilenet_v1 is qat's own network"):
        build_detector("mobilenet_v1", num_categories=2, resolution=64, backbone_weights="DEFAULT")
    assert downloads.calls == []
