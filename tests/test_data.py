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
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data._utils.collate import default_collate
from torchvision import transforms
from torchvision.datasets import ImageFolder

from qat.data import imagefolder, memory, synthetic
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
        assert isinstance(train.dataset, memory.InMemoryImages)  # decode once under DDP too: each rank its shard
        shards = [DataLoader(train.dataset, batch_size=2, collate_fn=train.collate_fn,
                             sampler=DistributedSampler(train.dataset, num_replicas=2, rank=rank, seed=0))
                  for rank in (0, 1)]
        labels = [torch.cat([y for _, y in shard]).tolist() for shard in shards]
        assert len(labels[0]) == len(labels[1]) == 6 and sorted(labels[0] + labels[1]) == [0] * 4 + [1] * 4 + [2] * 4
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
    train = build_classification_loaders(tiny, resolution=8, batch_size=4, hflip=0.0, in_memory=False).train
    assert not _flips(train.dataset.transform)
    assert build_classification_loaders(tiny, resolution=8, batch_size=4, hflip=0.0).train.collate_fn.hflip == 0.0
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
    assert data.train.collate_fn.hflip == 0.0  # the decode-once pipeline (data.in_memory=auto) flips in the batch


# --- decode once (data.in_memory) ----------------------------------------------------------------------------


def _batches(loader: object, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch as the training engine draws it: the global and the loader's generator seeded by ``seed``."""
    torch.manual_seed(seed)
    loader.generator.manual_seed(seed)  # type: ignore[attr-defined]
    return list(loader)  # type: ignore[call-overload]


def test_in_memory_val_equals_streamed(tiny: Path) -> None:
    """Evaluation crops are precomputed by the streamed pipeline's own resize and centre crop: every validation
    tensor is bit-identical (torch.equal) to the streamed one, so records' accuracies stay comparable."""
    for resolution, ratio in ((12, 0.875), (16, 1.0), (9, 0.6)):
        held = build_classification_loaders(tiny, resolution=resolution, batch_size=4, resize_ratio=ratio).val
        streamed = build_classification_loaders(tiny, resolution=resolution, batch_size=4, resize_ratio=ratio,
                                                in_memory=False).val
        assert isinstance(held.dataset, memory.InMemoryImages)
        assert isinstance(streamed.dataset, ImageFolder)
        pairs = list(zip(held, streamed, strict=True))
        assert pairs and all(torch.equal(a, b) and torch.equal(y, z) for (a, y), (b, z) in pairs)


def test_in_memory_false_is_the_streamed_pipeline(tiny: Path) -> None:
    data = build_classification_loaders(tiny, resolution=8, batch_size=4, train_crop_scale=(0.5, 1.0),
                                        in_memory="false")
    for loader in (data.train, data.val):
        assert type(loader.dataset) is ImageFolder and loader.collate_fn is default_collate
    steps = [type(t) for t in data.train.dataset.transform.transforms]
    assert steps == [transforms.RandomResizedCrop, transforms.RandomHorizontalFlip, transforms.ToTensor,
                     transforms.Normalize]
    assert data.train.dataset.transform.transforms[0].scale == (0.5, 1.0)
    with pytest.raises(QatError, match=r"^data\.in_memory: 'maybe'"):
        build_classification_loaders(tiny, resolution=8, batch_size=4, in_memory="maybe")


def test_in_memory_training_batches_are_seeded(tiny: Path) -> None:
    """Order and augmentation depend only on the seeds the engine sets each epoch (a resumed epoch re-draws its
    consumed batches and so continues exactly); another seed gives other crops."""
    train = build_classification_loaders(tiny, resolution=8, batch_size=4, seed=0).train
    assert isinstance(train.dataset, memory.InMemoryImages) and train.collate_fn is train.dataset.batch_transform
    first, again, other = _batches(train, 3), _batches(train, 3), _batches(train, 4)
    assert len(first) == 3 and all(x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 for x, _ in first)
    assert all(torch.equal(a, b) and torch.equal(y, z) for (a, y), (b, z) in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other, strict=True))
    rebuilt = build_classification_loaders(tiny, resolution=8, batch_size=4, seed=0).train
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, _batches(rebuilt, 3), strict=True))


@pytest.mark.parametrize(("size", "scale"), [((48, 48), (0.35, 1.0)), ((48, 48), (0.08, 1.0)),
                                             ((30, 64), (0.5, 1.0)), ((40, 30), (0.9, 1.0))])
def test_crop_boxes_follow_random_resized_crop(size: tuple[int, int], scale: tuple[float, float]) -> None:
    """Boxes lie inside the image with area fraction in ``scale`` and aspect in 3/4-4/3 (up to the rounding of
    their sides, as torchvision's), and their distribution is torchvision's ``get_params``' (the fallback
    included: a 30x64 image with scale >= 0.5 often takes it)."""
    height, width = size
    n = 3000
    torch.manual_seed(0)
    boxes = memory.random_resized_crop_boxes(torch.full((n,), height), torch.full((n,), width), scale).double()
    top, left, h, w = boxes.unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all())
    fitted = ((h * w) / (height * width) >= scale[0] - 0.05) & ((h * w) / (height * width) <= scale[1])
    assert bool(fitted.all())
    image = torch.zeros(3, height, width)
    reference = torch.tensor([transforms.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])
                              for _ in range(n)]).double()
    spread = reference.std(0)
    assert bool(((boxes.mean(0) - reference.mean(0)).abs() <= 4 * spread * (2 / n) ** 0.5 + 1e-9).all())
    assert bool(((boxes.std(0) - spread).abs() <= 4 * spread / n**0.5 + 1e-9).all())  # within 4 standard errors


def test_resized_crops_match_pil(tiny: Path) -> None:
    """The batched crop + resize is PIL's antialiased bilinear resize of the crop (torchvision's PIL path) to
    within one 8-bit level (ties at .5 round either way; PIL sometimes takes its passes in the other order)."""
    paths = sorted((tiny / "train").rglob("*.png"))
    images = [imagefolder.read_image(str(p)) for p in paths]
    batch = torch.stack([memory.to_uint8_chw(image) for image in images])
    torch.manual_seed(0)
    boxes = memory.random_resized_crop_boxes(torch.full((len(images),), 16), torch.full((len(images),), 16),
                                             (0.08, 1.0))
    boxes[0] = torch.tensor([0, 0, 16, 16])  # the whole image, resized down
    boxes[1] = torch.tensor([2, 3, 5, 7])  # a small crop, resized up
    for size in (12, 8, 23):
        ours = memory.resized_crops(batch, boxes, size)
        pil = torch.stack([memory.to_uint8_chw(transforms.functional.resized_crop(image, *box.tolist(), [size, size]))
                           for image, box in zip(images, boxes, strict=True)]).float()
        difference = (ours - pil).abs()
        assert difference.max() <= 2 and difference.mean() < 0.2 and abs(float((ours - pil).mean())) < 0.05


def test_flip_probability_zero_and_one(tiny: Path) -> None:
    """``data.hflip`` 1 mirrors every crop (the same crops: the flips are drawn after them), 0 draws no flip."""
    images = torch.randint(0, 256, (8, 3, 16, 20), dtype=torch.uint8)
    samples = [(image, i) for i, image in enumerate(images)]
    common = {"scale": (0.3, 1.0), "mean": imagefolder.IMAGENET_MEAN, "std": imagefolder.IMAGENET_STD}
    never = memory.RandomResizedCropFlip(10, hflip=0.0, **common)
    always = memory.RandomResizedCropFlip(10, hflip=1.0, **common)
    half = memory.RandomResizedCropFlip(10, hflip=0.5, **common)
    torch.manual_seed(1)
    plain, labels = never(samples)
    after_never = torch.rand(1)
    torch.manual_seed(1)
    flipped, _ = always(samples)
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)
    assert labels.tolist() == list(range(8))
    torch.manual_seed(1)
    never(samples)
    assert torch.equal(torch.rand(1), after_never)  # no draw of its own for the flip
    torch.manual_seed(1)
    mixed, _ = half(samples)
    mirrored = [torch.equal(m, p.flip(-1)) for m, p in zip(mixed, plain, strict=True)]
    kept = [torch.equal(m, p) for m, p in zip(mixed, plain, strict=True)]
    assert all(a or b for a, b in zip(mirrored, kept, strict=True)) and any(mirrored) and any(kept)


def test_images_of_different_sizes_are_padded(tiny: Path) -> None:
    """A held split whose images differ in size: batches are zero-padded and each crop uses its own image only."""
    small, large = torch.randint(0, 256, (3, 10, 14), dtype=torch.uint8), torch.randint(0, 256, (3, 17, 12),
                                                                                            dtype=torch.uint8)
    transform = memory.RandomResizedCropFlip(8, scale=(0.2, 1.0), hflip=0.5, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.manual_seed(2)
    batch, labels = transform([(small, 0), (large, 1)])
    torch.manual_seed(2)
    boxes = memory.random_resized_crop_boxes(torch.tensor([10, 17]), torch.tensor([14, 12]), (0.2, 1.0))
    flip = torch.rand(2) < 0.5
    for i, image in enumerate((small, large)):
        alone = memory.resized_crops(image[None], boxes[i : i + 1], 8, flip[i : i + 1])
        assert torch.equal(batch[i], memory.normalize_(alone, (0.5,) * 3, (0.25,) * 3)[0])
    assert labels.tolist() == [0, 1]


def test_split_over_the_bound_streams(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` holds a split only when its pixels fit the bound (ImageNet streams); ``true`` holds it anyway."""
    train_bytes = 12 * 3 * 16 * 16  # 12 decoded 16x16 training images
    val_bytes = 6 * 3 * 8 * 8  # 6 evaluation crops at 8 px
    assert memory.estimated_bytes(ImageFolder(str(tiny / "train")).samples) == train_bytes
    monkeypatch.setattr(imagefolder, "IN_MEMORY_MAX_MB", (train_bytes - 1) / 2**20)
    train, val, _ = build_classification_loaders(tiny, resolution=8, batch_size=4)
    assert type(train.dataset) is ImageFolder and train.collate_fn is default_collate
    assert isinstance(val.dataset, memory.InMemoryImages)
    monkeypatch.setattr(imagefolder, "IN_MEMORY_MAX_MB", (val_bytes - 1) / 2**20)
    _, val, _ = build_classification_loaders(tiny, resolution=8, batch_size=4)
    assert type(val.dataset) is ImageFolder
    train, val, _ = build_classification_loaders(tiny, resolution=8, batch_size=4, in_memory=True)
    assert isinstance(train.dataset, memory.InMemoryImages) and isinstance(val.dataset, memory.InMemoryImages)


def test_each_split_is_decoded_once(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding is lazy and shared per process: the training loader and a second, validation-only build decode
    each split once; a loader that is never drawn from decodes nothing."""
    memory.clear_cache()
    decoded: list[str] = []
    real = memory.InMemoryImages._decode
    monkeypatch.setattr(memory.InMemoryImages, "_decode", lambda self: (decoded.append(self.root), real(self))[1])
    data = build_classification_loaders(tiny, resolution=8, batch_size=4)
    val = build_classification_loaders(tiny, resolution=8, batch_size=2).val
    assert decoded == []
    next(iter(data.train))
    next(iter(val))
    list(data.val)
    list(data.train)
    assert decoded == [str(tiny / "train"), str(tiny / "val")]
    build_classification_loaders(tiny, resolution=8, batch_size=4, workers=1)  # forking workers: decoded up front
    build_classification_loaders(tiny, resolution=10, batch_size=4, workers=1)  # other evaluation crops
    assert decoded == [str(tiny / "train"), str(tiny / "val"), str(tiny / "val")]


def test_run_data_uses_data_in_memory(tiny: Path) -> None:
    from qat.classification import load_data
    from qat.schema import DataConfig, RunConfig

    cfg = RunConfig(data=DataConfig(name="imagefolder", root=str(tiny), batch_size=4, in_memory="false"))
    cfg.model.resolution = 8
    data, _ = load_data(cfg)
    assert type(data.train.dataset) is ImageFolder and type(data.val.dataset) is ImageFolder
