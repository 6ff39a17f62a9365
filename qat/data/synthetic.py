"""A small, seeded, built-in image-classification dataset ("demo") written to disk in ImageFolder layout.

Classes are defined by shape or texture (disk, square, triangle, cross, ring, star, crescent, stripes,
checker, dots, ...). Everything else is nuisance, drawn independently of the class: position, scale,
rotation, aspect, colours (light tinted objects on darker coloured backgrounds), background gradients,
distractor strokes, occluders, blur and Gaussian noise. Defaults are tuned so that MobileNet v2 trained
from scratch at 32 px for 15 epochs lands near 90% val top-1, not 100%.

Layout: ``<root>/demo-<hash>/{train,val}/<class>/<index>.png`` plus a ``manifest.json`` written last, so a
half-written dataset is never taken for a complete one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from qat.errors import QatError

GENERATOR = "qat.demo"
GENERATOR_VERSION = 3
MANIFEST_NAME = "manifest.json"
# the one place the demo dataset's default size lives (functions, CLI and qat.schema read it)
DEMO_DEFAULTS = {"num_classes": 10, "train_per_class": 1000, "val_per_class": 100, "image_size": 48, "seed": 0}
CLASS_NAMES: tuple[str, ...] = (
    "disk", "square", "triangle", "cross", "ring", "star",
    "crescent", "stripes", "checker", "dots", "frame", "hexagon",
)  # fmt: skip
_TEXTURES = frozenset({"stripes", "checker", "dots"})
_SUPERSAMPLE = 3  # anti-aliasing: masks are drawn on a finer grid and box-averaged
_SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class _Nuisance:
    """How hard the task is; part of the generator version (change both together).

    Backgrounds stay darker than objects on purpose: with backgrounds over the full 0..255 range,
    MobileNet v2 trained from scratch with SGD hardly gets off the ground in 15 epochs (measured).
    """

    radius: tuple[float, float] = (0.19, 0.33)  # object radius / image size
    background: tuple[float, float] = (0.0, 80.0)  # range of each background channel (0..255)
    object_level: tuple[float, float] = (150.0, 255.0)  # object grey level (mirrored on light backgrounds)
    tint: float = 40.0  # maximum per-channel deviation of the object colour from grey
    strokes_under: tuple[int, int] = (0, 2)  # distractor strokes drawn before the object (inclusive range)
    strokes_over: tuple[int, int] = (0, 2)  # ... and after it
    occlusion: float = 0.3  # probability of an occluding rectangle
    blur: float = 0.9  # maximum Gaussian blur radius (pixels)
    noise: tuple[float, float] = (2.0, 12.0)  # range of the Gaussian noise sigma (0..255 scale)
    waves: float = 20.0  # amplitude of low-frequency background waves
    shading: float = 0.25  # maximum relative brightness change across the object


NUISANCE = _Nuisance()


def default_cache_dir() -> Path:
    """``$QAT_CACHE`` if set, else ``~/.cache/qat``."""
    env = os.environ.get("QAT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qat"


def demo_params(
    *,
    num_classes: int = DEMO_DEFAULTS["num_classes"],
    train_per_class: int = DEMO_DEFAULTS["train_per_class"],
    val_per_class: int = DEMO_DEFAULTS["val_per_class"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    seed: int = DEMO_DEFAULTS["seed"],
) -> dict[str, int]:
    """The parameters that define a demo dataset (what the folder hash and the manifest are made of)."""
    params = {
        "num_classes": num_classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
        "image_size": image_size, "seed": seed,
    }  # fmt: skip
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise QatError("data.num_classes", f"{num_classes} is out of range", f"use 2..{len(CLASS_NAMES)}")
    for key in ("train_per_class", "val_per_class"):
        if params[key] < 1:
            raise QatError(f"data.{key}", f"{params[key]} is not positive", "use at least 1 image per class")
    if image_size < 8:
        raise QatError("data.image_size", f"{image_size} is too small", "use at least 8 pixels")
    return params


def demo_dir_name(params: dict[str, int]) -> str:
    """``demo-<hash>``: a short hash of the parameters and the generator version."""
    blob = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True).encode()
    return "demo-" + hashlib.sha256(blob).hexdigest()[:10]


def _is_complete(path: Path, params: dict[str, int]) -> bool:
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("generator") == GENERATOR
        and manifest.get("version") == GENERATOR_VERSION
        and manifest.get("params") == params
    )


def make_demo_dataset(
    root: str | os.PathLike[str] | None = None,
    *,
    num_classes: int = DEMO_DEFAULTS["num_classes"],
    train_per_class: int = DEMO_DEFAULTS["train_per_class"],
    val_per_class: int = DEMO_DEFAULTS["val_per_class"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    seed: int = DEMO_DEFAULTS["seed"],
    progress: bool = True,
) -> Path:
    """Generate the demo dataset under ``root`` (default ``<cache>/data``) unless it exists; return its path.

    Same parameters give byte-identical PNGs. The dataset is written to a temporary sibling folder and
    renamed into place with its manifest, so an interrupted run leaves no dataset that looks complete.
    """
    params = demo_params(
        num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
        image_size=image_size, seed=seed,
    )  # fmt: skip
    parent = Path(root).expanduser() if root is not None else default_cache_dir() / "data"
    target = parent / demo_dir_name(params)
    if _is_complete(target, params):
        return target
    if target.exists():
        raise QatError(
            "data.root",
            f"{target} exists but is not a complete demo dataset (no matching {MANIFEST_NAME})",
            "move or delete it, or pass another --root",
        )
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    try:
        _write_dataset(tmp, params, progress)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target, params):  # not a concurrent writer finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_dataset(out: Path, params: dict[str, int], progress: bool) -> None:
    classes = CLASS_NAMES[: params["num_classes"]]
    counts = {"train": params["train_per_class"], "val": params["val_per_class"]}
    total = len(classes) * sum(counts.values())
    renderer = _Renderer(params["image_size"])
    bar = tqdm(total=total, desc="demo dataset", unit="img", disable=None if progress else True)
    with bar:
        for split, per_class in counts.items():
            for label, name in enumerate(classes):
                folder = out / split / name
                folder.mkdir(parents=True)
                for index in range(per_class):
                    rng = np.random.default_rng([params["seed"], _SPLITS[split], label, index])
                    renderer.render(name, rng).save(folder / f"{index:05d}.png", format="PNG")
                    bar.update(1)
    manifest: dict[str, Any] = {
        "generator": GENERATOR, "version": GENERATOR_VERSION, "params": params, "classes": list(classes),
        "counts": {split: n * len(classes) for split, n in counts.items()},
    }  # fmt: skip
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


class _Renderer:
    """Draws one image of a class from a random generator; all geometry is in output-pixel units.

    Masks are drawn on a grid ``_SUPERSAMPLE`` times finer and box-averaged into alpha (anti-aliasing);
    colours are composited at output resolution.
    """

    def __init__(self, size: int, nuisance: _Nuisance | None = None) -> None:
        self.size = size
        self.nuisance = nuisance or NUISANCE
        fine = (np.arange(size * _SUPERSAMPLE, dtype=np.float32) + 0.5) / _SUPERSAMPLE
        self.x, self.y = np.meshgrid(fine, fine)
        coarse = np.arange(size, dtype=np.float32) + 0.5
        self.xc, self.yc = np.meshgrid(coarse, coarse)

    def _window(self, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
        """Output-pixel rows and columns covering the box ``[x0, x1] x [y0, y1]`` (clipped to the image)."""
        s = self.size
        cols = slice(min(max(int(x0), 0), s), min(max(int(np.ceil(x1)), 0), s))
        rows = slice(min(max(int(y0), 0), s), min(max(int(np.ceil(y1)), 0), s))
        return rows, cols

    def _fine(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        k = _SUPERSAMPLE
        fine = slice(rows.start * k, rows.stop * k), slice(cols.start * k, cols.stop * k)
        return self.x[fine], self.y[fine]

    def render(self, name: str, rng: np.random.Generator) -> Image.Image:
        s = float(self.size)
        img = self._background(rng)
        nz = self.nuisance
        for _ in range(rng.integers(nz.strokes_under[0], nz.strokes_under[1] + 1)):
            self._stroke(img, rng)
        level = rng.uniform(*nz.object_level)
        if img.mean() > 127.5:  # dark object on a light background
            level = 255.0 - level
        colour = level + rng.uniform(-nz.tint, nz.tint, size=3)
        cx, cy = rng.uniform(0.32 * s, 0.68 * s, size=2)
        radius = s * rng.uniform(*nz.radius)
        theta, aspect = rng.uniform(0, 2 * np.pi), np.exp(rng.uniform(-0.2, 0.2))
        reach = 1.45 * radius * max(aspect, 1.0 / aspect)  # every shape lies within 1.45 unit radii
        rows, cols = self._window(cx - reach, cy - reach, cx + reach, cy + reach)
        u, v = _object_frame(*self._fine(rows, cols), cx, cy, radius, theta, aspect)
        mask = _shape(name, u, v, rng)
        uc, vc = _object_frame(self.xc[rows, cols], self.yc[rows, cols], cx, cy, radius, theta, aspect)
        shade = 1.0 + rng.uniform(-nz.shading, nz.shading) * (0.7 * (uc + vc)).clip(-1.5, 1.5)[..., None]
        _blend(img[rows, cols], _alpha(mask), np.clip(colour * shade, 0, 255))
        for _ in range(rng.integers(nz.strokes_over[0], nz.strokes_over[1] + 1)):
            self._stroke(img, rng)
        if rng.random() < nz.occlusion:
            self._occluder(img, cx, cy, radius, rng)
        out = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, nz.blur)))
        noise = rng.normal(0, rng.uniform(*nz.noise), (self.size, self.size, 3)).astype(np.float32)
        return Image.fromarray(
            np.clip(np.asarray(out, dtype=np.float32) + noise, 0, 255).round().astype(np.uint8)
        )

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A random colour, a linear gradient towards another, and two low-frequency waves."""
        s = self.size
        base, other = rng.uniform(*self.nuisance.background, size=(2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        t = ((np.cos(angle) * self.xc + np.sin(angle) * self.yc) / s).clip(0, 1)[..., None]
        img = base + (other - base) * t * np.float32(rng.uniform(0.2, 0.8))
        for _ in range(2):
            k = rng.uniform(0.5, 2.5) * 2 * np.pi / s
            a = rng.uniform(0, 2 * np.pi)
            wave = np.sin(k * (np.cos(a) * self.xc + np.sin(a) * self.yc) + rng.uniform(0, 2 * np.pi))
            img += wave[..., None] * rng.uniform(-self.nuisance.waves, self.nuisance.waves, size=3).astype(
                np.float32
            )
        return img

    def _stroke(self, img: np.ndarray, rng: np.random.Generator) -> None:
        """A distractor: a thin line segment or a small blob of random colour."""
        s = self.size
        p = rng.uniform(0, s, size=2)
        if rng.random() < 0.7:
            d = rng.normal(0, 0.35 * s, size=2)
            width = rng.uniform(0.4, 1.2)
            q = p + d
            rows, cols = self._window(
                min(p[0], q[0]) - 2, min(p[1], q[1]) - 2, max(p[0], q[0]) + 2, max(p[1], q[1]) + 2
            )
            x, y = self._fine(rows, cols)
            t = (((x - p[0]) * d[0] + (y - p[1]) * d[1]) / max(float(d @ d), 1e-6)).clip(0, 1)
            mask = (x - p[0] - t * d[0]) ** 2 + (y - p[1] - t * d[1]) ** 2 <= width**2
        else:
            r = rng.uniform(1.0, 0.06 * s + 1.0)
            rows, cols = self._window(p[0] - r - 1, p[1] - r - 1, p[0] + r + 1, p[1] + r + 1)
            x, y = self._fine(rows, cols)
            mask = (x - p[0]) ** 2 + (y - p[1]) ** 2 <= r**2
        _blend(img[rows, cols], _alpha(mask), rng.uniform(0, 255, size=3))

    def _occluder(
        self, img: np.ndarray, cx: float, cy: float, radius: float, rng: np.random.Generator
    ) -> None:
        """A rectangle of random colour covering part of the object."""
        a = rng.uniform(0, 2 * np.pi)
        dist = radius * rng.uniform(0.6, 1.2)
        ox, oy = cx + np.cos(a) * dist, cy + np.sin(a) * dist
        hw, hh = radius * rng.uniform(0.2, 0.5, size=2)
        rows, cols = self._window(ox - hw - 1, oy - hh - 1, ox + hw + 1, oy + hh + 1)
        x, y = self._fine(rows, cols)
        mask = (np.abs(x - ox) <= hw) & (np.abs(y - oy) <= hh)
        _blend(img[rows, cols], _alpha(mask), rng.uniform(0, 255, size=3))


def _object_frame(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, radius: float, theta: float, aspect: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates to object coordinates: centred, rotated, scaled to unit radius."""
    dx, dy = x - np.float32(cx), y - np.float32(cy)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    return (c * dx + s * dy) / np.float32(radius * aspect), (c * dy - s * dx) * np.float32(aspect / radius)


def _alpha(mask: np.ndarray) -> np.ndarray:
    """Box-average a boolean mask on the fine grid into float32 coverage at output resolution."""
    k = _SUPERSAMPLE
    h, w = mask.shape[0] // k, mask.shape[1] // k
    m = np.ascontiguousarray(mask).view(np.uint8).reshape(h, k, w * k)
    rows = m[:, 0].copy()
    for i in range(1, k):
        rows += m[:, i]
    rows = rows.reshape(h, w, k)
    acc = rows[..., 0].copy()
    for i in range(1, k):
        acc += rows[..., i]
    return acc.astype(np.float32)[..., None] * np.float32(1.0 / (k * k))


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    img += alpha * (colour.astype(np.float32) - img)


def _polygon(u: np.ndarray, v: np.ndarray, sides: int, inradius: float) -> np.ndarray:
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        a = np.pi / 2 + 2 * np.pi * k / sides
        inside &= u * np.cos(a) + v * np.sin(a) <= inradius
    return inside


def _shape(name: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The boolean mask of class ``name`` in object coordinates (unit radius)."""
    r2 = u * u + v * v
    if name in _TEXTURES:
        region = r2 <= 1.0 if rng.random() < 0.5 else np.maximum(np.abs(u), np.abs(v)) <= 0.9
        n = rng.uniform(2.5, 4.0)  # pattern periods across the diameter
        if name == "stripes":
            return region & (np.sin(np.pi * n * u + rng.uniform(0, 2 * np.pi)) > 0)
        if name == "checker":
            phase = rng.uniform(0, 2 * np.pi, size=2)
            return region & (np.sin(np.pi * n * u + phase[0]) * np.sin(np.pi * n * v + phase[1]) > 0)
        fu, fv = (u * n / 2 + rng.random()) % 1.0 - 0.5, (v * n / 2 + rng.random()) % 1.0 - 0.5
        return region & (fu * fu + fv * fv <= rng.uniform(0.25, 0.35) ** 2)
    if name == "disk":
        return r2 <= 1.0
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= rng.uniform(0.45, 0.7) ** 2)
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if name == "frame":
        m = np.maximum(np.abs(u), np.abs(v))
        return (m <= 0.85) & (m >= 0.85 * rng.uniform(0.45, 0.7))
    if name == "triangle":
        return _polygon(u, v, 3, 0.5)
    if name == "hexagon":
        return _polygon(u, v, 6, 0.9)
    if name == "cross":
        w = rng.uniform(0.22, 0.35)
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= 0.95)) | ((av <= w) & (au <= 0.95))
    if name == "star":
        phi = np.arctan2(v, u) * 5 / (2 * np.pi)
        tri = 1.0 - 2.0 * np.abs(phi - np.floor(phi) - 0.5)  # 1 at the tips, 0 between
        inner = rng.uniform(0.4, 0.55)
        return np.sqrt(r2) <= inner + (1.0 - inner) * tri
    if name == "crescent":
        d, r = rng.uniform(0.35, 0.6), rng.uniform(0.75, 0.95)
        return (r2 <= 1.0) & ((u - d) ** 2 + v * v > r * r)
    raise ValueError(f"unknown demo class {name!r}")


def main(argv: list[str] | None = None) -> int:
    """``qat-demo-data``: generate the demo dataset (if missing) and print its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", default=None, help="parent folder (default: $QAT_CACHE/data or ~/.cache/qat/data)"
    )
    parser.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"])
    parser.add_argument("--num-classes", type=int, default=DEMO_DEFAULTS["num_classes"])
    parser.add_argument("--train-per-class", type=int, default=DEMO_DEFAULTS["train_per_class"])
    parser.add_argument("--val-per-class", type=int, default=DEMO_DEFAULTS["val_per_class"])
    parser.add_argument("--image-size", type=int, default=DEMO_DEFAULTS["image_size"])
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        path = make_demo_dataset(
            args.root, num_classes=args.num_classes, train_per_class=args.train_per_class,
            val_per_class=args.val_per_class, image_size=args.image_size, seed=args.seed,
            progress=not args.quiet,
        )  # fmt: skip
    except QatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
