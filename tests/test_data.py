"""The data layer: the seeded demo dataset generator and the ImageFolder loaders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import transforms

from qat.data import imagefolder, synthetic
from qat.data.imagefolder import build_classification_loaders, check_layout
from qat.data.synthetic import CLASS_NAMES, default_cache_dir, main, make_demo_dataset
from qat.errors import QatError

TINY = {"num_classes": 3, "train_per_class": 4, "val_per_class": 2, "image_size": 16, "progress": False}


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0, **TINY)


# --- generator -------------------------------------------------------------------------------------------


def test_layout_counts_and_manifest(tiny: Path) -> None:
    assert tiny.name.startswith("demo-")
    classes = list(CLASS_NAMES[:3])
    for split, per_class in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (tiny / split).iterdir()) == sorted(classes)
        for name in classes:
            files = sorted((tiny / split / name).glob("*.png"))
            assert len(files) == per_class
            with Image.open(files[0]) as img:
                assert img.size == (16, 16) and img.mode == "RGB"
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["classes"] == classes
    assert manifest["counts"] == {"train": 12, "val": 6}
    assert manifest["params"]["seed"] == 0 and manifest["params"]["image_size"] == 16
    assert manifest["version"] == synthetic.GENERATOR_VERSION
    assert not [p for p in tiny.parent.iterdir() if p.name.endswith(".tmp")]  # temporary folder renamed


def test_same_seed_same_bytes_other_seed_other_bytes(tiny: Path, tmp_path: Path) -> None:
    again = make_demo_dataset(tmp_path / "a", seed=0, **TINY)
    assert again.name == tiny.name
    assert tree_hashes(again) == tree_hashes(tiny)
    other = make_demo_dataset(tmp_path / "b", seed=1, **TINY)
    assert other.name != tiny.name
    ours, theirs = tree_hashes(tiny), tree_hashes(other)
    assert ours.keys() == theirs.keys()
    assert all(ours[k] != theirs[k] for k in ours)


def test_images_vary_within_class(tiny: Path) -> None:
    hashes = tree_hashes(tiny)
    assert len(set(hashes.values())) == len(hashes)


def test_second_call_does_not_regenerate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_demo_dataset(tmp_path, **TINY)
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "_write_dataset", boom)
    assert make_demo_dataset(tmp_path, **TINY) == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps
    with pytest.raises(AssertionError, match="regenerated"):  # other parameters: a new folder
        make_demo_dataset(tmp_path, **{**TINY, "train_per_class": 5})


def test_other_parameters_get_their_own_folder(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path, **TINY)
    b = make_demo_dataset(tmp_path, **{**TINY, "val_per_class": 3})
    assert a != b and a.parent == b.parent == tmp_path
    assert len(list((a / "val" / CLASS_NAMES[0]).glob("*.png"))) == 2
    assert len(list((b / "val" / CLASS_NAMES[0]).glob("*.png"))) == 3


def test_incomplete_folder_is_not_taken_nor_deleted(tmp_path: Path) -> None:
    target = make_demo_dataset(tmp_path, **TINY)
    (target / "manifest.json").unlink()  # e.g. a half-copied dataset or user data under that name
    with pytest.raises(QatError) as err:
        make_demo_dataset(tmp_path, **TINY)
    assert err.value.key == "data.root" and str(target) in str(err.value)
    assert (target / "train").is_dir()


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def render(self: object, name: str, rng: object) -> Image.Image:
        calls.append(name)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return Image.new("RGB", (16, 16))

    monkeypatch.setattr(synthetic._Renderer, "render", render)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(QatError, match="data.num_classes"):
        make_demo_dataset(tmp_path, **{**TINY, "num_classes": len(CLASS_NAMES) + 1})
    with pytest.raises(QatError, match="data.train_per_class"):
        make_demo_dataset(tmp_path, **{**TINY, "train_per_class": 0})
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QAT_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("QAT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "qat"


def test_default_root_is_cache_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QAT_CACHE", str(tmp_path))
    path = make_demo_dataset(**TINY)
    assert path.parent == tmp_path / "data" and path.name.startswith("demo-")


def test_cli_prints_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--root", str(tmp_path), "--seed", "3", "--num-classes", "2", "--train-per-class", "2"]
    argv += ["--val-per-class", "1", "--image-size", "12", "--quiet"]
    assert main(argv) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.parent == tmp_path and (path / "manifest.json").is_file()
    assert json.loads((path / "manifest.json").read_text())["params"]["seed"] == 3
    assert main([*argv[:-1], "--num-classes", "99"]) == 2
    assert "data.num_classes" in capsys.readouterr().err


# --- loaders ---------------------------------------------------------------------------------------------


def test_loaders_shapes_and_classes(tiny: Path) -> None:
    data = build_classification_loaders(tiny, resolution=12, batch_size=4, seed=0)
    train, val, classes = data
    assert classes == sorted(CLASS_NAMES[:3]) and data.num_classes == 3
    batches = list(train)
    assert len(batches) == 3  # 12 images, batch 4
    for x, y in batches:
        assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32
        assert y.min() >= 0 and y.max() < 3
    xs, ys = zip(*val, strict=True)
    assert [len(y) for y in ys] == [4, 2]  # val keeps every image
    assert all(x.shape[1:] == (3, 12, 12) for x in xs)
    assert torch.cat(ys).tolist() == [0, 0, 1, 1, 2, 2]  # in order
    assert abs(float(torch.cat(xs).mean())) < 3.0  # normalised, not raw 0..255


def test_train_shuffle_is_seeded(tiny: Path) -> None:
    def order(seed: int) -> list[int]:
        loader = build_classification_loaders(tiny, resolution=8, batch_size=12, seed=seed).train
        return torch.cat([y for _, y in loader]).tolist()

    assert order(5) == order(5)
    assert sorted(order(5)) == [0] * 4 + [1] * 4 + [2] * 4
    assert any(order(5) != order(s) for s in (6, 7, 8))


def test_val_resize_ratio(tiny: Path) -> None:
    _, val_tf = imagefolder.classification_transforms(224)
    assert val_tf.transforms[0].size == 256 and val_tf.transforms[1].size == (224, 224)
    _, val_tf = imagefolder.classification_transforms(299)
    assert val_tf.transforms[0].size == 342


def test_distributed_sampler(tiny: Path, tmp_path: Path) -> None:
    import torch.distributed as dist

    with pytest.raises(QatError, match="data.distributed"):
        build_classification_loaders(tiny, resolution=8, batch_size=4, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train, val, _ = build_classification_loaders(tiny, resolution=8, batch_size=4, distributed=True)
        assert isinstance(train.sampler, DistributedSampler) and isinstance(val.sampler, DistributedSampler)
        assert train.sampler.shuffle and not val.sampler.shuffle
        assert sum(len(y) for _, y in val) == 6
    finally:
        dist.destroy_process_group()


# --- bad layouts: QatError naming data.root and the path, before any loading ------------------------------


def _copy(tiny: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(tiny, root)
    return root


def _remove_val(root: Path) -> Path:
    shutil.rmtree(root / "val")
    return root / "val"


def _empty_train(root: Path) -> Path:
    shutil.rmtree(root / "train")
    (root / "train").mkdir()
    return root / "train"


def _class_without_images(root: Path) -> Path:
    folder = root / "val" / CLASS_NAMES[1]
    for p in folder.iterdir():
        p.unlink()
    (folder / "notes.txt").write_text("not an image")
    return folder


def _classes_differ(root: Path) -> Path:
    shutil.rmtree(root / "val" / CLASS_NAMES[2])
    return root / "val"


@pytest.mark.parametrize("breaker", [_remove_val, _empty_train, _class_without_images, _classes_differ])
def test_bad_layout_raises_before_loading(
    breaker, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(tiny, tmp_path)
    named = breaker(root)

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("ImageFolder built before the layout was checked")

    monkeypatch.setattr(imagefolder, "ImageFolder", no_loading)
    with pytest.raises(QatError) as err:
        build_classification_loaders(root, resolution=8, batch_size=2)
    assert err.value.key == "data.root"
    message = str(err.value)
    assert str(named) in message
    assert "<root>/train/<class>" in message and "<root>/val/<class>" in message


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(QatError) as err:
        build_classification_loaders(missing, resolution=8, batch_size=2)
    assert err.value.key == "data.root" and str(missing) in str(err.value)
    (tmp_path / "file").write_text("")
    with pytest.raises(QatError, match="data.root"):
        check_layout(tmp_path / "file")


def test_nested_images_count(tiny: Path, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path)
    folder = root / "train" / CLASS_NAMES[0]
    (folder / "sub").mkdir()
    for p in list(folder.glob("*.png")):
        os.replace(p, folder / "sub" / p.name)
    assert check_layout(root) == sorted(CLASS_NAMES[:3])


# --- augmentation (data.hflip) ---------------------------------------------------------------------------


def _flips(transform: object) -> list[object]:
    return [t for t in transform.transforms if isinstance(t, transforms.RandomHorizontalFlip)]  # type: ignore[attr-defined]


def test_hflip_probability_is_config(tiny: Path) -> None:
    """``data.hflip``: 0 leaves no flip step (the transform is the crop alone, deterministic given its random
    parameters), 1 flips every image, the default 0.5 is ImageNet's (today's) flip."""
    image = Image.open(next((tiny / "train").rglob("*.png"))).convert("RGB")
    never, _ = imagefolder.classification_transforms(16, train_crop_scale=(0.5, 1.0), hflip=0.0)
    always, _ = imagefolder.classification_transforms(16, train_crop_scale=(0.5, 1.0), hflip=1.0)
    default, _ = imagefolder.classification_transforms(16)
    assert not _flips(never) and [f.p for f in _flips(always)] == [1.0] and [f.p for f in _flips(default)] == [0.5]
    for seed in range(5):  # the crop draws its parameters first: the same seed gives the same crop
        torch.manual_seed(seed)
        plain = never(image)
        torch.manual_seed(seed)
        assert torch.equal(never(image), plain)
        torch.manual_seed(seed)
        flipped = always(image)
        assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)
    train = build_classification_loaders(tiny, resolution=8, batch_size=4, hflip=0.0).train
    assert not _flips(train.dataset.transform)
    for bad in (-0.1, 1.5):
        with pytest.raises(QatError, match=r"^data\.hflip: "):
            imagefolder.classification_transforms(16, hflip=bad)


@pytest.mark.parametrize("data", ["demo", "imagefolder", "imagenet"])
def test_composed_config_accepts_data_hflip(data: str) -> None:
    import sys

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from qat.schema import DataConfig, RunConfig

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "experiments"))
    from _cli import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        default = compose("run", overrides=[f"data={data}", "data.root=/x"])
        off = compose("run", overrides=[f"data={data}", "data.root=/x", "data.hflip=0"])
    assert default.data.hflip == DataConfig().hflip == 0.5
    config = OmegaConf.to_object(off)
    assert isinstance(config, RunConfig) and config.data.hflip == 0.0


def test_run_data_uses_data_hflip(tiny: Path) -> None:
    from qat.classification import load_data
    from qat.schema import DataConfig, RunConfig

    cfg = RunConfig(data=DataConfig(name="imagefolder", root=str(tiny), batch_size=4, hflip=0.0))
    cfg.model.resolution = 8
    data, _ = load_data(cfg)
    assert not _flips(data.train.dataset.transform)
