"""The embedded dataset: procedural outdoor scenes generated from a seed, so the default run needs no download.

Scene design (version 1)
------------------------
Every image is a small outdoor scene: a tilted horizon splits an *upper* stuff region from a *lower*
one, and 1–3 foreground objects stand in front. The image-level class is the class of the largest
object (the "main" object, drawn last and at least 1/0.7× the area of all other objects of any one
class); main classes are exactly balanced per split.

- Stuff (6 segmentation classes). Upper: `sky`, `wall`, `foliage` (with probability 0.4 two of them
  side by side); lower: `lawn`, `road`, `water`. Textures are crops of scikit-image's bundled texture
  photographs (brick → wall, grass → foliage/lawn, gravel → road), area-downsampled 1.5–3× so that
  their structure sits at the 4–8 px HOG cell scale, and tinted with a random colour per image.
- Objects (10 classes): `box`, `triangle`, `star`, `ring`, `cross`, `crescent`, plus two pairs that
  look *identical* and are told apart only by context:
  `ball` vs `balloon` (a disk below vs above the horizon) and `car` vs `boat` (the same hull shape
  standing on road/lawn vs on water). Object appearance (colour, and a solid, striped, checked or
  photo-textured fill) is drawn independently of the class, so shape and context are the only cues.
- Segmentation needs position and context: `foliage`/`lawn` share the grass texture and colour
  distribution, `sky`/`water` share a smooth-gradient generator; only their position relative to the
  horizon (which moves between 28% and 70% of the height and tilts) tells them apart. The same holds
  for `ball`/`balloon` and `car`/`boat`.
- Edges are rendered crisp: shapes and region boundaries are evaluated on a 4×4 sub-pixel grid; a
  pixel that mixes two classes gets ignore label 255 in the mask (a 1-pixel band, like VOC's outlines).

Measured (version 1, 5000 train / 1000 val, 2 shared CPU cores): classification chance is 10%; an
L2 logistic regression on standardised raw pixels reaches 37% at 32 px and 35% at 64 px, a 6-conv
CNN trained from scratch for 15 epochs 86% at 32 px. Per-pixel stuff labels from a local 5×5 patch:
foliage/lawn 57% correct (the pair's chance level), 92% once the pixel's row is given too; the rest
needs the horizon, i.e. context. Writing 6000 images of 64 px takes ~15 s (2 processes).

On-disk layout written by `generate_embedded` (read by the real loaders in `layouts`):
    OUT/meta.json
    OUT/classification/{train,val}/<class>/<split>_<index>.png     (ImageFolder, lossless)
    OUT/segmentation/JPEGImages/<split>_<index>.png                 (VOC layout; hard links to the PNGs)
    OUT/segmentation/SegmentationClass/<split>_<index>.png          (palette PNG, 255 = ignore)
    OUT/segmentation/ImageSets/Segmentation/{train,val}.txt
    OUT/segmentation/classes.txt
"""

from __future__ import annotations

import colorsys
import errno
import functools
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from semanticmim.data.layouts import IGNORE_INDEX
from semanticmim.errors import InputError

__all__ = [
    "CLASSIFICATION_DIR",
    "GENERATOR_VERSION",
    "OBJECT_CLASSES",
    "SEGMENTATION_CLASSES",
    "SEGMENTATION_DIR",
    "STUFF_CLASSES",
    "EmbeddedScene",
    "generate_arrays",
    "generate_embedded",
    "generate_scene",
    "iter_scenes",
]

GENERATOR_VERSION = 1
# Sorted, so that ImageFolder's sorted class folders give the same indices as the segmentation masks.
OBJECT_CLASSES = ("ball", "balloon", "boat", "box", "car", "crescent", "cross", "ring", "star", "triangle")
STUFF_CLASSES = ("foliage", "lawn", "road", "sky", "wall", "water")
SEGMENTATION_CLASSES = OBJECT_CLASSES + STUFF_CLASSES
CLASSIFICATION_DIR = "classification"
SEGMENTATION_DIR = "segmentation"

_UPPER_STUFF = ("sky", "wall", "foliage")
_LOWER_STUFF = ("lawn", "road", "water")
_SUPERSAMPLE = 4  # sub-pixels per side used to find each pixel's coverage
_SPLIT_CODES = {"train": 0, "val": 1}
_MAIN_SPREAD = 0.12  # main object centres ~ N(image centre, 0.12·size), clipped
_TYPICAL_COLOUR_P = 0.5  # chance that an object's first colour is its shape's typical hue


# -------------------------------------------------------------------------------------------- shapes
# Each shape is an inside test on object-local coordinates (u right, v down) in units of the radius.


def _in_polygon(u: np.ndarray, v: np.ndarray, vertices: tuple[tuple[float, float], ...]) -> np.ndarray:
    inside = np.zeros(u.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, vertices[1:] + vertices[:1], strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        inside ^= crosses & (u < x1 + (v - y1) * (x2 - x1) / (y2 - y1))
    return inside


def _regular(count: int, radii: tuple[float, ...]) -> tuple[tuple[float, float], ...]:
    """Vertices at equal angles starting straight up, radii cycling through `radii` (a star: two)."""
    return tuple(
        (
            radii[i % len(radii)] * math.sin(2 * math.pi * i / count),
            -radii[i % len(radii)] * math.cos(2 * math.pi * i / count),
        )
        for i in range(count)
    )


_TRIANGLE = _regular(3, (1.0,))
_STAR = _regular(10, (1.0, 0.42))
# A vehicle silhouette shared by `car` and `boat`: a hull with an off-centre cabin; bottom at v = 0.4.
_HULL_BODY = ((-1.0, -0.05), (1.0, -0.05), (0.78, 0.4), (-0.78, 0.4))
_HULL_CABIN = ((-0.5, 0.0), (-0.32, -0.48), (0.3, -0.48), (0.48, 0.0))
_HULL_TOP, _HULL_BOTTOM = -0.48, 0.4

_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disk": lambda u, v: u * u + v * v <= 1.0,
    "ring": lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= 0.3),
    "box": lambda u, v: (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8),
    "triangle": lambda u, v: _in_polygon(u, v + 0.2, _TRIANGLE),
    "star": lambda u, v: _in_polygon(u, v, _STAR),
    "cross": lambda u, v: ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(u) <= 1.0) & (np.abs(v) <= 0.32)),
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v > 0.72),
    "hull": lambda u, v: _in_polygon(u, v, _HULL_BODY) | _in_polygon(u, v, _HULL_CABIN),
}
_SHAPE_OF = {"ball": "disk", "balloon": "disk", "car": "hull", "boat": "hull"}
_TYPICAL_HUE = {shape: i / len(_SHAPES) for i, shape in enumerate(_SHAPES)}


def _shape(class_name: str) -> str:
    return _SHAPE_OF.get(class_name, class_name)


# ---------------------------------------------------------------------------------------- the scene


@dataclass(frozen=True)
class EmbeddedScene:
    """One generated sample: image uint8 [H, W, 3], mask uint8 [H, W] (SEGMENTATION_CLASSES indices,
    255 on mixed boundary pixels), label = OBJECT_CLASSES index of the largest object."""

    image: np.ndarray
    mask: np.ndarray
    label: int


@dataclass(frozen=True)
class _Horizon:
    y0: float  # height at the image centre, px
    slope: float  # dy/dx

    def at(self, x: np.ndarray | float, size: int) -> np.ndarray | float:
        return self.y0 + self.slope * (np.asarray(x) - size / 2)

    def span(self, x0: float, x1: float, size: int) -> tuple[float, float]:
        """(min, max) height of the horizon over columns x0..x1."""
        a, b = float(self.at(x0, size)), float(self.at(x1, size))
        return min(a, b), max(a, b)


@dataclass(frozen=True)
class _Object:
    class_name: str
    cx: float
    cy: float
    radius: float
    angle: float
    mirror: bool


def generate_scene(size: int, main_class: int, rng: np.random.Generator) -> EmbeddedScene:
    """Draw one scene of `size`×`size` px whose largest object is OBJECT_CLASSES[main_class]."""
    main_name = OBJECT_CLASSES[main_class]
    horizon = _sample_horizon(rng, size, main_name)
    upper, lower = _sample_stuff(rng, main_name)
    main = _place_main(rng, size, main_name, horizon)
    distractors = [
        obj for obj in (_place_distractor(rng, size, horizon, lower) for _ in range(rng.integers(0, 3))) if obj
    ]
    image, mask = _render(rng, size, horizon, upper, lower, distractors, main)
    return EmbeddedScene(image, mask, main_class)


def _sample_horizon(rng: np.random.Generator, size: int, main_name: str) -> _Horizon:
    # balloons need sky room above the horizon, ground objects need ground below it
    low, high = {"balloon": (0.5, 0.7), "ball": (0.28, 0.5), "car": (0.28, 0.5), "boat": (0.28, 0.5)}.get(
        main_name, (0.28, 0.7)
    )
    return _Horizon(rng.uniform(low, high) * size, rng.uniform(-0.15, 0.15))


def _sample_stuff(rng: np.random.Generator, main_name: str) -> tuple[list[str], str]:
    """Upper stuff (one, or two side by side) and the lower stuff; boats need water, cars need land."""
    upper = [str(name) for name in rng.choice(_UPPER_STUFF, size=1 + int(rng.random() < 0.4), replace=False)]
    choices = {"boat": ("water",), "car": ("lawn", "road")}.get(main_name, _LOWER_STUFF)
    return upper, str(rng.choice(choices))


def _vertical_room(class_name: str, cx: float, r: float, size: int, horizon: _Horizon) -> tuple[float, float]:
    """The interval of centre heights where an object may stand: balloons wholly above the horizon,
    balls and hulls wholly below it (they may be cut by the bottom edge), other shapes anywhere."""
    low, high = horizon.span(cx - r, cx + r, size)
    # extents above/below the centre in radii; hulls tilt by ≤ 0.15 rad, moving corners by ≤ 0.12 radius
    above, below = (0.12 - _HULL_TOP, _HULL_BOTTOM + 0.12) if _shape(class_name) == "hull" else (1.0, 1.0)
    if class_name == "balloon":
        return 0.7 * r, low - 1 - below * r
    if class_name in ("ball", "car", "boat"):
        return high + 1 + above * r, size + 0.3 * r - below * r
    return 0.7 * r, size - 0.7 * r


def _place(
    rng: np.random.Generator, size: int, class_name: str, radius: float, horizon: _Horizon, spread: float | None
) -> _Object | None:
    """A position where the object's class allows it (shrinking the object until one exists).

    spread: None = uniform over the image; else centres are drawn around the image centre with this
    standard deviation (× size), as in object-centric photos (heights stay uniform within the room a
    balloon, ball or hull has).
    """
    constrained = class_name in ("balloon", "ball", "car", "boat")
    for attempt in range(30):
        r = radius * 0.9**attempt
        if spread is None:
            cx = rng.uniform(0.7 * r, size - 0.7 * r)
        else:
            cx = float(np.clip(rng.normal(size / 2, spread * size), 0.7 * r, size - 0.7 * r))
        top, bottom = _vertical_room(class_name, cx, r, size, horizon)
        if top > bottom:
            continue
        if spread is None or constrained:
            cy = rng.uniform(top, bottom)
        else:
            cy = float(np.clip(rng.normal(size / 2, spread * size), top, bottom))
        angle = rng.uniform(-0.15, 0.15) if _shape(class_name) == "hull" else rng.uniform(0, 2 * math.pi)
        return _Object(class_name, cx, float(cy), r, angle, bool(rng.random() < 0.5))
    return None


def _place_main(rng: np.random.Generator, size: int, main_name: str, horizon: _Horizon) -> _Object:
    obj = _place(rng, size, main_name, rng.uniform(0.2, 0.32) * size, horizon, _MAIN_SPREAD)
    if obj is None:  # cannot happen for the horizon ranges of `_sample_horizon`; a loud guard, not a fallback
        raise RuntimeError(f"could not place a {main_name} in a {size} px scene")
    return obj


def _place_distractor(rng: np.random.Generator, size: int, horizon: _Horizon, lower: str) -> _Object | None:
    """A small object of any class; disks and hulls take the class their context gives them."""
    class_name = str(rng.choice(OBJECT_CLASSES))
    radius = max(2.5, rng.uniform(0.08, 0.14) * size)
    if _shape(class_name) == "disk":
        class_name = "balloon" if rng.random() < 0.5 else "ball"
    elif _shape(class_name) == "hull":
        class_name = "boat" if lower == "water" else "car"
    return _place(rng, size, class_name, radius, horizon, None)


# ------------------------------------------------------------------------------------------ rendering


def _subpixel_axis(start: int, stop: int) -> np.ndarray:
    return start + (np.arange((stop - start) * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE


def _pool(inside: np.ndarray) -> np.ndarray:
    """bool [h·S, w·S] → coverage float32 [h, w] (exactly 1.0 where every sub-pixel is inside)."""
    h, w = inside.shape[0] // _SUPERSAMPLE, inside.shape[1] // _SUPERSAMPLE
    # explicit adds of strided uint8 views: ~30× faster than .mean(axis=(1, 3)) on small arrays
    rows = inside.view(np.uint8).reshape(h, _SUPERSAMPLE, w * _SUPERSAMPLE)
    counts = functools.reduce(np.add, (rows[:, i] for i in range(_SUPERSAMPLE))).reshape(h, w, _SUPERSAMPLE)
    counts = functools.reduce(np.add, (counts[..., i] for i in range(_SUPERSAMPLE)))
    return counts.astype(np.float32) * (1.0 / _SUPERSAMPLE**2)


def _object_coverage(obj: _Object, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """The object's bounding box in the image and its coverage float32 [h, w] inside it."""
    extent = 1.15 * obj.radius
    y0, y1 = max(0, math.floor(obj.cy - extent)), min(size, math.ceil(obj.cy + extent))
    x0, x1 = max(0, math.floor(obj.cx - extent)), min(size, math.ceil(obj.cx + extent))
    dy = (_subpixel_axis(y0, y1)[:, None] - obj.cy) / obj.radius
    dx = (_subpixel_axis(x0, x1)[None, :] - obj.cx) / obj.radius
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    inside = _SHAPES[_shape(obj.class_name)](-u if obj.mirror else u, v)
    return (slice(y0, y1), slice(x0, x1)), _pool(inside)


def _region_coverage(size: int, inside: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    axis = _subpixel_axis(0, size)
    return _pool(inside(axis[None, :], axis[:, None]))


def _render(
    rng: np.random.Generator,
    size: int,
    horizon: _Horizon,
    upper: list[str],
    lower: str,
    distractors: list[_Object],
    main: _Object,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint stuff then objects back to front; a pixel is labelled by the top layer covering it fully,
    or 255 when its top-most touching layer covers it only partly."""
    full = (slice(0, size), slice(0, size))
    layers = [(upper[0], full, np.ones((size, size), np.float32))]
    if len(upper) == 2:
        split_x, split_slope = rng.uniform(0.3, 0.7) * size, rng.uniform(-0.3, 0.3)
        layers.append((upper[1], full, _region_coverage(size, lambda x, y: x > split_x + split_slope * (y - size / 2))))
    layers.append((lower, full, _region_coverage(size, lambda x, y: y > horizon.at(x, size))))
    layers += _object_layers(size, distractors, main)

    image = np.zeros((size, size, 3), np.float32)
    label = np.zeros((size, size), np.uint8)
    mixed = np.zeros((size, size), bool)
    for name, box, coverage in layers:
        h, w = coverage.shape
        paint = _stuff_texture(rng, name, size)[box] if name in STUFF_CLASSES else _object_fill(rng, name, h, w)
        image[box] += (paint - image[box]) * coverage[..., None]
        covered = coverage >= 1.0
        label[box][covered] = SEGMENTATION_CLASSES.index(name)
        mixed[box] = (mixed[box] & ~covered) | ((coverage > 0) & ~covered)
    label[mixed] = IGNORE_INDEX
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), label


def _object_layers(
    size: int, distractors: list[_Object], main: _Object
) -> list[tuple[str, tuple[slice, slice], np.ndarray]]:
    """Coverage layers, distractors first; a distractor is dropped when it (plus the kept distractors of
    its class) would reach 0.7× the main object's area, so the main object is the largest by a margin."""
    main_box, main_coverage = _object_coverage(main, size)
    budget = 0.7 * float(main_coverage.sum())
    used: dict[str, float] = {}
    layers = []
    for obj in distractors:
        box, coverage = _object_coverage(obj, size)
        area = used.get(obj.class_name, 0.0) + float(coverage.sum())
        if area < budget and coverage.size:
            used[obj.class_name] = area
            layers.append((obj.class_name, box, coverage))
    layers.append((main.class_name, main_box, main_coverage))
    return layers


# ------------------------------------------------------------------------------------------ appearance


@functools.cache
def _texture_sources() -> dict[str, np.ndarray]:
    """scikit-image's bundled texture photographs (no download), float32 [512, 512] in [0, 1]."""
    from skimage import data

    return {
        "brick": np.ascontiguousarray(data.brick().T, dtype=np.float32) / 255,  # bricks lying, not standing
        "grass": data.grass().astype(np.float32) / 255,
        "gravel": data.gravel().astype(np.float32) / 255,
    }


def _texture_patch(rng: np.random.Generator, source: str, height: int, width: int) -> np.ndarray:
    """A random crop 1.5–3× larger than (height, width), area-downsampled (crisp, never upsampled) and
    standardised to zero mean, unit variance: float32 [height, width]."""
    texture = _texture_sources()[source]
    zoom = rng.uniform(1.5, 3.0)
    ch, cw = (min(texture.shape[0], max(1, round(side * zoom))) for side in (height, width))
    top, left = rng.integers(0, texture.shape[0] - ch + 1), rng.integers(0, texture.shape[1] - cw + 1)
    crop = texture[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    patch = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BOX))
    return (patch - patch.mean()) / (patch.std() + 1e-6)


def _hsv(
    rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]
) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.uniform(*hue) % 1.0, rng.uniform(*sat), rng.uniform(*val)), np.float32)


def _tinted(rng: np.random.Generator, source: str, size: int, colour: np.ndarray) -> np.ndarray:
    contrast = rng.uniform(0.25, 0.45)
    return colour * (1 + contrast * _texture_patch(rng, source, size, size))[..., None]


def _smooth_gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sky and water alike: a vertical two-colour gradient with faint low-frequency clouds and grain."""
    top, bottom = (_hsv(rng, (0.5, 0.66), (0.05, 0.6), (0.55, 0.95)) for _ in range(2))
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    clouds = rng.normal(0, 1, (4, 4)).astype(np.float32)
    clouds = np.asarray(Image.fromarray(clouds).resize((size, size), Image.BICUBIC))
    grain = rng.normal(0, 0.012, (size, size, 1)).astype(np.float32)
    return top * (1 - t) + bottom * t + 0.04 * clouds[..., None] + grain


def _stuff_texture(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """float32 [size, size, 3] for a stuff class; foliage/lawn and sky/water share their generators."""
    if name in ("sky", "water"):
        return _smooth_gradient(rng, size)
    if name in ("foliage", "lawn"):
        return _tinted(rng, "grass", size, _hsv(rng, (0.17, 0.36), (0.35, 0.8), (0.35, 0.75)))
    if name == "wall":
        return _tinted(rng, "brick", size, _hsv(rng, (-0.02, 0.08), (0.2, 0.7), (0.4, 0.8)))
    return _tinted(rng, "gravel", size, _hsv(rng, (0.05, 0.15), (0.0, 0.25), (0.35, 0.7)))  # road


def _object_fill(rng: np.random.Generator, class_name: str, height: int, width: int) -> np.ndarray:
    """An object's paint: solid, stripes, checks or a tinted photo texture. Half of the objects of a
    shape take its typical hue (a weak cue, like the colour statistics of real classes); look-alike
    classes (ball/balloon, car/boat) share a shape and therefore their colours too."""
    hue = _TYPICAL_HUE[_shape(class_name)]
    hue_range = (hue - 0.04, hue + 0.04) if rng.random() < _TYPICAL_COLOUR_P else (0.0, 1.0)
    first = _hsv(rng, hue_range, (0.5, 1.0), (0.4, 1.0))
    second = _hsv(rng, (0, 1), (0.3, 1.0), (0.25, 1.0))
    style = rng.integers(0, 4)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if style == 0:
        return np.broadcast_to(first, (height, width, 3))
    if style == 1:
        angle, period = rng.uniform(0, math.pi), rng.uniform(3.5, 8.0)
        phase = (x * math.cos(angle) + y * math.sin(angle)) / period
        pattern = (phase - np.floor(phase)) < 0.5
    elif style == 2:
        cell = rng.uniform(3.0, 6.0)
        pattern = (np.floor(x / cell) + np.floor(y / cell)) % 2 == 0
    else:
        source = str(rng.choice(("brick", "grass", "gravel")))
        return first * (1 + 0.4 * _texture_patch(rng, source, height, width))[..., None]
    return np.where(pattern[..., None], first, second)


# ---------------------------------------------------------------------------------------- generation


def _main_classes(seed: int, split: str, count: int) -> np.ndarray:
    """Exactly balanced main classes (counts differ by at most one), shuffled: int64 [count]."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 1 << 30])
    return rng.permutation(np.arange(count) % len(OBJECT_CLASSES))


def _scene(size: int, seed: int, split: str, index: int, main_class: int) -> EmbeddedScene:
    # one generator per image: the dataset does not depend on how the work is split across processes
    return generate_scene(size, main_class, np.random.default_rng([seed, _SPLIT_CODES[split], index]))


def iter_scenes(size: int, count: int, seed: int = 0, split: str = "train") -> Iterator[EmbeddedScene]:
    """The scenes `generate_embedded` writes for `split`, in index order, without touching disk."""
    _check_split(split)
    for index, main_class in enumerate(_main_classes(seed, split, count)):
        yield _scene(size, seed, split, index, int(main_class))


def generate_arrays(
    size: int, count: int, seed: int = 0, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-memory version: images uint8 [N, H, W, 3], masks uint8 [N, H, W], labels int64 [N]."""
    scenes = list(iter_scenes(size, count, seed, split))
    return (
        np.stack([scene.image for scene in scenes]),
        np.stack([scene.mask for scene in scenes]),
        np.array([scene.label for scene in scenes], dtype=np.int64),
    )


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODES:
        raise InputError(f"embedded split {split!r} unknown; expected one of {', '.join(_SPLIT_CODES)}")


def _write_chunk(
    out: str, size: int, seed: int, split: str, indices: list[int], classes: list[int], palette: list[int]
) -> None:
    root = Path(out)
    for index, main_class in zip(indices, classes, strict=True):
        scene = _scene(size, seed, split, index, main_class)
        name = f"{split}_{index:06d}"
        image_path = root / CLASSIFICATION_DIR / split / OBJECT_CLASSES[scene.label] / f"{name}.png"
        Image.fromarray(scene.image).save(image_path, compress_level=1)
        _link_or_copy(image_path, root / SEGMENTATION_DIR / "JPEGImages" / f"{name}.png")
        mask = Image.fromarray(scene.mask)
        mask.putpalette(palette)
        mask.save(root / SEGMENTATION_DIR / "SegmentationClass" / f"{name}.png")


def _link_or_copy(source: Path, target: Path) -> None:
    """The segmentation view shares the classification PNG: a hard link costs no encoding and no disk."""
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.EOPNOTSUPP):
            raise
        shutil.copyfile(source, target)  # a filesystem without hard links


def generate_embedded(
    out: str | Path,
    image_size: int = 64,
    train: int = 5000,
    val: int = 1000,
    seed: int = 0,
    workers: int | None = None,
) -> dict:
    """Write the embedded dataset to `out` (layout in the module docstring) and return its meta.json.

    The folder appears atomically: everything is written to a sibling temp folder that is renamed into
    place at the end. An existing `out` is replaced only when it is an earlier embedded dataset.
    workers: processes to generate with (default: one per CPU, at most 8; 1 = in this process).
    """
    out = Path(out)
    _validate(out, image_size, train, val)
    counts = {"train": train, "val": val}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _make_folders(tmp, counts)
        _generate_all(tmp, image_size, seed, counts, workers)
        meta = _meta(image_size, seed, counts)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _validate(out: Path, image_size: int, train: int, val: int) -> None:
    if not 16 <= image_size <= 512:
        raise InputError(f"image_size={image_size}: expected 16..512 px")
    if train < 1 or val < 1:
        raise InputError(f"train={train}, val={val}: expected at least one image per split")
    if out.exists() and not (out / "meta.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an embedded dataset (no meta.json); refusing to replace it")


def _make_folders(root: Path, counts: dict[str, int]) -> None:
    for split in counts:
        for name in OBJECT_CLASSES:
            (root / CLASSIFICATION_DIR / split / name).mkdir(parents=True)
    segmentation = root / SEGMENTATION_DIR
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (segmentation / sub).mkdir(parents=True)
    for split, count in counts.items():
        ids = "".join(f"{split}_{index:06d}\n" for index in range(count))
        (segmentation / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(ids)
    (segmentation / "classes.txt").write_text("\n".join(SEGMENTATION_CLASSES) + "\n")


def _generate_all(root: Path, size: int, seed: int, counts: dict[str, int], workers: int | None) -> None:
    from semanticmim.data.layouts import voc_palette  # imports torch: here, once, not in every worker

    palette = voc_palette()
    jobs = []
    for split, count in counts.items():
        classes = _main_classes(seed, split, count).tolist()
        for start in range(0, count, 250):
            indices = list(range(start, min(count, start + 250)))
            jobs.append((str(root), size, seed, split, indices, classes[start : start + 250], palette))
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            _write_chunk(*job)
        return
    # fork: workers need only numpy and PIL, and re-importing the package (torch) under spawn costs seconds
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        for future in [pool.submit(_write_chunk, *job) for job in jobs]:
            future.result()


def _meta(size: int, seed: int, counts: dict[str, int]) -> dict:
    class_counts = {
        split: np.bincount(_main_classes(seed, split, count), minlength=len(OBJECT_CLASSES)).tolist()
        for split, count in counts.items()
    }
    return {
        "generator": "semanticmim.data.embedded",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": size,
        "splits": counts,
        "classes": list(OBJECT_CLASSES),
        "class_counts": class_counts,
        "segmentation_classes": list(SEGMENTATION_CLASSES),
        "ignore_index": IGNORE_INDEX,
        "classification_root": CLASSIFICATION_DIR,
        "segmentation_root": SEGMENTATION_DIR,
    }


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to `out`; an old `out` is moved aside first, then deleted."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
