"""Readers for the on-disk dataset layouts, and the torch Datasets built on them.

A reader turns a root folder + split name into a *split*: the class names and a sorted list of
samples, after checking the layout (a missing or mis-laid-out root is a one-line `InputError` that
shows the layout expected). Nothing is decoded at that point; the Datasets decode lazily.

Layouts (`LAYOUTS`):
- `imagefolder`: `ROOT/<split>/<class>/*.{jpg,png,...}` (CIFAR-10 as JPEGs, the embedded dataset).
- `imagenet`:    the same with `ROOT/{train,val}/<wnid>/*.JPEG`; classes are the sorted `train/` wnids,
                 frozen into a class-index JSON the first time one is asked for.
- `voc`:         `ROOT/{JPEGImages,SegmentationClass,SegmentationClassAug,ImageSets/Segmentation}`;
                 `trainaug` labels come from `SegmentationClassAug`; palette PNGs, read as indices.
- `ade20k`:      `ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}`;
                 reduce-zero-label (0 → 255, 1..150 → 0..149).
- `pairs`:       `ROOT/images/` + `ROOT/labels/` + `ROOT/{split}.txt`, or SegNet/CamVid's
                 `ROOT/{split}/` + `ROOT/{split}annot/`; class names from `ROOT/classes.txt`.

Segmentation labels become int64 arrays with 255 = ignore. A label value that is neither a class
index nor a declared void/ignore value is an `InputError` naming the file: silently training on it
would give wrong results. Unreadable images (corrupt, truncated) are *skipped*: the Dataset returns
a deterministic substitute, so an epoch never crashes and batch shapes stay fixed, and records the
file in `skipped` and, across DataLoader workers, in a JSON-lines report file.
"""

from __future__ import annotations

import abc
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from semanticmim.data.decode import EncodedImage, UnreadableImage, load_rgb
from semanticmim.errors import InputError

__all__ = [
    "ADE20K_CLASSES",
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "VOC_CLASSES",
    "ClassificationDataset",
    "ClassificationSplit",
    "LabelMap",
    "SegmentationDataset",
    "SegmentationSplit",
    "SkipLog",
    "available_splits",
    "image_to_tensor",
    "read_ade20k",
    "read_imagefolder",
    "read_imagenet",
    "read_label",
    "read_pairs",
    "read_split",
    "read_voc",
    "voc_palette",
    "write_class_index",
]

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

# objectInfo150 order (as in mmseg's ADE20KDataset), i.e. label k+1 on disk is class k after reduce-zero.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair",
    "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box",
    "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet",
    "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower",
    "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle",
    "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)  # fmt: skip

_IMAGEFOLDER_TREE = "ROOT/<split>/<class>/*.jpg|png"
_IMAGENET_TREE = "ROOT/{train,val}/<wnid>/*.JPEG"
_VOC_TREE = "ROOT/{JPEGImages,SegmentationClass[Aug]}/ + ROOT/ImageSets/Segmentation/<split>.txt"
_ADE20K_TREE = "ROOT/ADEChallengeData2016/{images,annotations}/{training,validation}/"
_PAIRS_TREE = "ROOT/images/ + ROOT/labels/ + ROOT/<split>.txt, or ROOT/<split>/ + ROOT/<split>annot/"


# ------------------------------------------------------------------------------------------ splits


@dataclass(frozen=True)
class LabelMap:
    """How raw label values on disk become training ids: class k → k, void/ignore → 255, else error.

    num_classes: classes after the mapping; reduce_zero: ADE20K's shift (0 → ignore, v → v-1);
    void_values: raw values that mean "unlabelled" (255 always does).
    """

    num_classes: int
    reduce_zero: bool = False
    void_values: tuple[int, ...] = ()

    def lookup_table(self) -> np.ndarray:
        """int64[256]: raw uint8 value → training id, -1 for values that must not occur."""
        table = np.full(256, -1, dtype=np.int64)
        offset = 1 if self.reduce_zero else 0
        table[offset : offset + self.num_classes] = np.arange(self.num_classes)
        table[IGNORE_INDEX] = IGNORE_INDEX
        if self.reduce_zero:
            table[0] = IGNORE_INDEX
        for value in self.void_values:
            table[value] = IGNORE_INDEX
        return table

    def apply(self, raw: np.ndarray, path: str | Path) -> np.ndarray:
        """raw: uint8/uint16 [H, W] → int64 [H, W]; InputError naming `path` for out-of-range values."""
        if raw.size and int(raw.max()) > 255:
            raise InputError(f"{path}: label value {int(raw.max())} outside {self.describe()}")
        mapped = self.lookup_table()[raw.astype(np.intp, copy=False)]
        if (mapped < 0).any():
            bad = np.unique(raw[mapped < 0])[:5].tolist()
            raise InputError(f"{path}: label value(s) {bad} outside {self.describe()}")
        return mapped

    def describe(self) -> str:
        first = 1 if self.reduce_zero else 0
        valid = [f"classes {first}..{first + self.num_classes - 1}", "255 = ignore"]
        if self.reduce_zero:
            valid.append("0 = ignore")
        valid += [f"{value} = void" for value in self.void_values]
        return f"the valid values ({', '.join(valid)})"


@dataclass(frozen=True)
class ClassificationSplit:
    """One split of an image-classification dataset: `samples[i] = (image path, class index)`."""

    root: Path
    name: str
    classes: tuple[str, ...]
    samples: list[tuple[str, int]] = field(repr=False)

    @property
    def image_paths(self) -> list[str]:
        return [image for image, _ in self.samples]


@dataclass(frozen=True)
class SegmentationSplit:
    """One split of a segmentation dataset: `samples[i] = (image path, label PNG path)`."""

    root: Path
    name: str
    classes: tuple[str, ...]
    samples: list[tuple[str, str]] = field(repr=False)
    label_map: LabelMap = field(default_factory=lambda: LabelMap(21))

    @property
    def image_paths(self) -> list[str]:
        return [image for image, _ in self.samples]


Split = ClassificationSplit | SegmentationSplit


# ---------------------------------------------------------------------------------- classification


def read_imagefolder(
    root: str | Path, split: str = "train", classes: tuple[str, ...] | None = None
) -> ClassificationSplit:
    """`ROOT/<split>/<class>/*.<image ext>` → a ClassificationSplit.

    classes: the class order; default = sorted folder names of `ROOT/train` when it exists (so that
    every split shares train's indices even when a class folder is missing from a small split), else
    of `ROOT/<split>`. A class folder not in `classes` is an InputError.
    """
    root = Path(root)
    split_dir = _require_dir(root / split, root, "imagefolder", _IMAGEFOLDER_TREE)
    if classes is None:
        reference = root / "train" if (root / "train").is_dir() else split_dir
        classes = tuple(sorted(_subdirs(reference)))
    index = {name: i for i, name in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for class_name in sorted(_subdirs(split_dir)):
        if class_name not in index:
            raise InputError(f"{split_dir / class_name}: class folder not in the class list ({len(classes)} classes)")
        samples += [(path, index[class_name]) for path in _image_files(split_dir / class_name)]
    if not samples:
        raise InputError(f"{split_dir}: no images found; expected {_IMAGEFOLDER_TREE}")
    return ClassificationSplit(root, split, tuple(classes), samples)


def read_imagenet(root: str | Path, split: str = "train", class_index: str | Path | None = None) -> ClassificationSplit:
    """ImageNet-1K as `ROOT/{train,val}/<wnid>/*.JPEG`.

    class_index: a JSON `{wnid: index}` file; when it exists it fixes the class order, when it does
    not it is written (once) from the sorted `train/` wnids, so later runs and other splits agree.
    """
    root = Path(root)
    if not (root / "train").is_dir() and not (root / split).is_dir():
        raise InputError(f"{root}: not an ImageNet root; expected {_IMAGENET_TREE}")
    classes = None
    if class_index is not None and Path(class_index).is_file():
        classes = _read_class_index(Path(class_index))
    result = read_imagefolder(root, split, classes)
    if class_index is not None and not Path(class_index).is_file():
        write_class_index(result.classes, class_index)
    return result


def write_class_index(classes: tuple[str, ...] | list[str], path: str | Path) -> None:
    """Write `{class name: index}` as JSON, atomically."""
    _write_atomic(Path(path), json.dumps({name: i for i, name in enumerate(classes)}, indent=1) + "\n")


def _read_class_index(path: Path) -> tuple[str, ...]:
    try:
        mapping = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot read class index ({error}); expected JSON {{wnid: index}}") from None
    if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(len(mapping))):
        raise InputError(f"{path}: expected JSON {{wnid: index}} with indices 0..N-1")
    return tuple(sorted(mapping, key=mapping.__getitem__))


# ------------------------------------------------------------------------------------ segmentation


def read_voc(root: str | Path, split: str = "train", classes: tuple[str, ...] | None = None) -> SegmentationSplit:
    """PascalVOC 2012 (+SBD): ids from `ImageSets/Segmentation/<split>.txt`, images `JPEGImages/<id>.jpg`,
    labels `SegmentationClass/<id>.png` (`SegmentationClassAug/` for `trainaug`).

    ROOT may be `VOC2012/` or a folder holding `VOCdevkit/VOC2012/`. classes: default the 21 VOC
    classes, or the names in `ROOT/classes.txt` when present (the embedded dataset writes one).
    """
    root = _find_root(Path(root), ("VOCdevkit/VOC2012", "VOC2012"), "JPEGImages", "voc", _VOC_TREE)
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise InputError(f"{list_file}: split list not found; expected {_VOC_TREE}")
    label_dir = root / ("SegmentationClassAug" if split == "trainaug" else "SegmentationClass")
    _require_dir(label_dir, root, "voc", _VOC_TREE)
    ids = _read_id_list(list_file)
    images = _match_ids(ids, root / "JPEGImages", list_file)
    labels = _match_ids(ids, label_dir, list_file, extensions=(".png",))
    classes = _classes_file(root) or classes or VOC_CLASSES
    return SegmentationSplit(root, split, classes, list(zip(images, labels, strict=True)), LabelMap(len(classes)))


def read_ade20k(root: str | Path, split: str = "training") -> SegmentationSplit:
    """ADE20K (SceneParsing, 150 classes): `images/<split>/*.jpg` + `annotations/<split>/*.png`.

    split: `training`/`validation` (or `train`/`val`). ROOT may be `ADEChallengeData2016/` or its parent.
    Labels use reduce-zero-label: 0 ("other") → 255, 1..150 → 0..149.
    """
    root = _find_root(Path(root), ("ADEChallengeData2016",), "images", "ade20k", _ADE20K_TREE)
    folder = {"train": "training", "val": "validation"}.get(split, split)
    image_dir = _require_dir(root / "images" / folder, root, "ade20k", _ADE20K_TREE)
    label_dir = _require_dir(root / "annotations" / folder, root, "ade20k", _ADE20K_TREE)
    images = _image_files(image_dir)
    if not images:
        raise InputError(f"{image_dir}: no images found; expected {_ADE20K_TREE}")
    ids = [Path(image).stem for image in images]
    labels = _match_ids(ids, label_dir, image_dir, extensions=(".png",))
    classes = _classes_file(root) or ADE20K_CLASSES
    return SegmentationSplit(
        root, split, classes, list(zip(images, labels, strict=True)), LabelMap(len(classes), reduce_zero=True)
    )


def read_pairs(root: str | Path, split: str = "train", void_label: int | None = None) -> SegmentationSplit:
    """A generic image/label pair layout with class names in `ROOT/classes.txt` (one per line).

    - `ROOT/images/` + `ROOT/labels/` + ids in `ROOT/<split>.txt` (or `ROOT/splits/<split>.txt`);
    - SegNet/CamVid: `ROOT/<split>/` + `ROOT/<split>annot/` (+ optional `ROOT/<split>.txt`).
    Labels are index PNGs with the same stem as their image. void_label: a raw value meaning
    "unlabelled" (→ 255); in the SegNet layout it defaults to len(classes) (CamVid's 11 = void).
    """
    root = Path(root)
    classes = _classes_file(root)
    if classes is None:
        raise InputError(f"{root / 'classes.txt'}: not found; the pairs layout needs one class name per line")
    if (root / f"{split}annot").is_dir():
        image_dir, label_dir = _require_dir(root / split, root, "pairs", _PAIRS_TREE), root / f"{split}annot"
        void_label = len(classes) if void_label is None else void_label
        list_file = root / f"{split}.txt"
        ids = _read_id_list(list_file) if list_file.is_file() else [Path(p).stem for p in _image_files(image_dir)]
    elif (root / "images").is_dir() and (root / "labels").is_dir():
        image_dir, label_dir = root / "images", root / "labels"
        candidates = [root / f"{split}.txt", root / "splits" / f"{split}.txt"]
        list_file = next((path for path in candidates if path.is_file()), None)
        if list_file is None:
            raise InputError(f"{candidates[0]}: split list not found; expected {_PAIRS_TREE}")
        ids = _read_id_list(list_file)
    else:
        raise InputError(f"{root}: no {split}/+{split}annot/ or images/+labels/ folders; expected {_PAIRS_TREE}")
    if not ids:
        raise InputError(f"{root}: split {split!r} lists no images; expected {_PAIRS_TREE}")
    source = list_file if list_file.is_file() else image_dir
    images = _match_ids(ids, image_dir, source)
    labels = _match_ids(ids, label_dir, source, extensions=(".png",))
    if void_label is not None and not 0 <= void_label <= 255:
        raise InputError(f"void_label={void_label}: expected a uint8 label value 0..255")
    void = () if void_label is None else (void_label,)
    return SegmentationSplit(
        root, split, classes, list(zip(images, labels, strict=True)), LabelMap(len(classes), False, void)
    )


# --------------------------------------------------------------------------------- layout registry

LAYOUTS = ("imagefolder", "imagenet", "voc", "ade20k", "pairs")


def available_splits(layout: str, root: str | Path) -> list[str]:
    """The splits of a dataset root that exist on disk, in a conventional order."""
    root = Path(root)
    _check_layout(layout)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; expected a {layout} layout {_tree(layout)}")
    if layout in ("imagefolder", "imagenet"):
        found = [name for name in _subdirs(root) if _subdirs(root / name)]
        return sorted(found, key=_split_order)
    if layout == "voc":
        voc = _find_root(root, ("VOCdevkit/VOC2012", "VOC2012"), "JPEGImages", "voc", _VOC_TREE)
        lists = voc / "ImageSets" / "Segmentation"
        names = [p.stem for p in lists.glob("*.txt")] if lists.is_dir() else []
        return sorted(names, key=_split_order)
    if layout == "ade20k":
        ade = _find_root(root, ("ADEChallengeData2016",), "images", "ade20k", _ADE20K_TREE)
        return [name for name in ("training", "validation") if (ade / "images" / name).is_dir()]
    annotated = [p.name[: -len("annot")] for p in root.iterdir() if p.is_dir() and p.name.endswith("annot")]
    listed = [p.stem for p in [*root.glob("*.txt"), *root.glob("splits/*.txt")] if p.name != "classes.txt"]
    names = annotated if annotated else listed
    return sorted(set(names), key=_split_order)


def read_split(layout: str, root: str | Path, split: str, **options: Any) -> Split:
    """Dispatch to the reader of `layout` (one of LAYOUTS); options go to that reader."""
    _check_layout(layout)
    reader: Callable[..., Split] = {
        "imagefolder": read_imagefolder,
        "imagenet": read_imagenet,
        "voc": read_voc,
        "ade20k": read_ade20k,
        "pairs": read_pairs,
    }[layout]
    return reader(root, split, **options)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"unknown dataset layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _tree(layout: str) -> str:
    return {
        "imagefolder": _IMAGEFOLDER_TREE,
        "imagenet": _IMAGENET_TREE,
        "voc": _VOC_TREE,
        "ade20k": _ADE20K_TREE,
        "pairs": _PAIRS_TREE,
    }[layout]


def _split_order(name: str) -> tuple[int, str]:
    order = ("train", "training", "trainaug", "val", "validation", "test")
    return (order.index(name) if name in order else len(order), name)


# ------------------------------------------------------------------------------------ file helpers


def _subdirs(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return [entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")]


def _image_files(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        names = [
            entry.name
            for entry in entries
            if entry.is_file()
            and not entry.name.startswith(".")
            and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return [str(folder / name) for name in sorted(names)]


def _require_dir(folder: Path, root: Path, layout: str, tree: str) -> Path:
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; expected a {layout} layout {tree}")
    if not folder.is_dir():
        raise InputError(f"{root}: missing {folder.relative_to(root)}/; expected a {layout} layout {tree}")
    return folder


def _find_root(root: Path, nested: tuple[str, ...], marker: str, layout: str, tree: str) -> Path:
    """The folder holding `marker`: ROOT itself or one of the conventional nested folders below it."""
    for candidate in (root, *(root / sub for sub in nested)):
        if (candidate / marker).is_dir():
            return candidate
    what = "no such folder" if not root.exists() else f"no {marker}/ folder"
    raise InputError(f"{root}: {what}; expected a {layout} layout {tree}")


def _read_id_list(list_file: Path) -> list[str]:
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def _match_ids(ids: list[str], folder: Path, source: Path, extensions: tuple[str, ...] | None = None) -> list[str]:
    """For each id the file `folder/<id><ext>` (any image extension, unless given); InputError if absent."""
    by_stem: dict[str, str] = {}
    for path in reversed(_image_files(folder)) if folder.is_dir() else []:
        if extensions is None or Path(path).suffix.lower() in extensions:
            by_stem[Path(path).stem] = path
    missing = [name for name in ids if name not in by_stem]
    if missing:
        raise InputError(f"{folder}: {len(missing)} file(s) listed in {source} are missing (first: {missing[0]!r})")
    return [by_stem[name] for name in ids]


def _classes_file(root: Path) -> tuple[str, ...] | None:
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names or len(names) > 255:
        raise InputError(f"{path}: expected 1..255 class names, one per line; found {len(names)}")
    return names


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ labels


def read_label(path: str | Path) -> np.ndarray:
    """An index label PNG → uint8/uint16 [H, W] of the stored indices (the palette index for mode P).

    Raises UnreadableImage for a corrupt file and InputError for a colour (RGB) label, which has no
    class indices to read.
    """
    try:
        with Image.open(path) as label:
            label.load()
            if label.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
                raise InputError(f"{path}: label is a {label.mode} image; expected an index PNG (mode P or L)")
            return np.asarray(label)
    except InputError:
        raise
    except FileNotFoundError:
        raise UnreadableImage(path, "no such file") from None
    except Exception as error:  # PIL raises many types on corrupt data, see decode.load_rgb
        raise UnreadableImage(path, f"{type(error).__name__}: {error}") from error


def voc_palette() -> list[int]:
    """PascalVOC's 256-colour palette as a flat [r, g, b, ...] list (index 255 → (224, 224, 192))."""
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        value = index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette += rgb
    return palette


# ---------------------------------------------------------------------------------------- datasets


class SkipLog:
    """Unreadable files met while loading: kept in memory and, when `report` is given, appended as one
    JSON line each to that file, so that what DataLoader worker processes skip is visible to the parent.
    """

    def __init__(self, report: str | Path | None = None):
        self.report = Path(report) if report is not None else None
        self._entries: dict[str, str] = {}
        self._lock = threading.Lock()

    def record(self, path: str | Path, reason: str) -> None:
        with self._lock:
            if str(path) in self._entries:
                return
            self._entries[str(path)] = reason
            if self.report is not None:
                self.report.parent.mkdir(parents=True, exist_ok=True)
                # one short write in append mode: lines from several workers do not interleave
                with open(self.report, "a") as handle:
                    handle.write(json.dumps({"path": str(path), "reason": reason}) + "\n")

    def entries(self) -> list[dict[str, str]]:
        """All skipped files (this process and the report file), sorted by path."""
        merged = dict(self._entries)
        if self.report is not None and self.report.is_file():
            for line in self.report.read_text().splitlines(keepends=True):
                if line.endswith("\n") and line.strip():  # a line still being written is read next time
                    entry = json.loads(line)
                    merged.setdefault(entry["path"], entry["reason"])
        return [{"path": path, "reason": merged[path]} for path in sorted(merged)]


def image_to_tensor(image: Image.Image | EncodedImage) -> torch.Tensor:
    """RGB image [H, W] → float32 [3, H, W] in [0, 1]."""
    if isinstance(image, EncodedImage):
        image = image.decode()[0]
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def _default_joint(image: Image.Image | EncodedImage, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return image_to_tensor(image), torch.from_numpy(label)


class _SkippingDataset(Dataset, abc.ABC):
    """Shared substitute-on-unreadable logic: sample i that cannot be read is replaced by i+1, i+2, ...

    lazy_decode: hand transforms an `EncodedImage` (header parsed, pixels not yet decoded) so that they
    can decode a JPEG at the DCT reduction their crop allows; they must accept one (ours do).
    """

    def __init__(self, split: Split, skip_report: str | Path | None, lazy_decode: bool):
        self.split = split
        self.skip_log = SkipLog(skip_report)
        self.lazy_decode = lazy_decode
        self._unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.split.samples)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """`[{path, reason}]` of every file skipped so far, in all worker processes sharing the report."""
        return self.skip_log.entries()

    def _image(self, path: str) -> Image.Image | EncodedImage:
        return EncodedImage.from_file(path) if self.lazy_decode else load_rgb(path)

    @abc.abstractmethod
    def _load(self, index: int) -> Any:
        """Sample `index`, transformed; raises UnreadableImage when one of its files cannot be decoded."""

    def __getitem__(self, index: int) -> Any:
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"index {index} out of range for {count} samples")
        index %= count
        for offset in range(count):
            candidate = (index + offset) % count
            if candidate in self._unreadable:
                continue
            try:
                return self._load(candidate)
            except UnreadableImage as error:
                self._unreadable.add(candidate)
                self.skip_log.record(error.path, error.reason)
        raise InputError(f"{self.split.root}: none of the {count} {self.split.name} images could be read")


class ClassificationDataset(_SkippingDataset):
    """Yields `(transform(image), class index)`; default transform: float32 [3, H, W] in [0, 1].

    skip_report: a JSON-lines file each skipped (unreadable) image is appended to. lazy_decode: see
    `_SkippingDataset`.
    """

    def __init__(
        self,
        split: ClassificationSplit,
        transform: Callable[[Image.Image], Any] | None = None,
        skip_report: str | Path | None = None,
        lazy_decode: bool = False,
    ):
        super().__init__(split, skip_report, lazy_decode)
        self.transform = transform or image_to_tensor
        self.targets = [label for _, label in split.samples]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.split.classes

    def _load(self, index: int) -> tuple[Any, int]:
        path, label = self.split.samples[index]
        return self.transform(self._image(path)), label


class SegmentationDataset(_SkippingDataset):
    """Yields `joint_transform(image, label)` with label int64 [H, W] (255 = ignore); default: float32
    [3, H, W] in [0, 1] and int64 [H, W] tensors.

    An image or label file that cannot be decoded is skipped (see module docstring); a label value
    outside the class range, or a label whose size differs from its image's, is an InputError.
    """

    def __init__(
        self,
        split: SegmentationSplit,
        joint_transform: Callable[[Image.Image, np.ndarray], Any] | None = None,
        skip_report: str | Path | None = None,
        lazy_decode: bool = False,
    ):
        super().__init__(split, skip_report, lazy_decode)
        self.joint_transform = joint_transform or _default_joint

    @property
    def classes(self) -> tuple[str, ...]:
        return self.split.classes

    def _load(self, index: int) -> Any:
        image_path, label_path = self.split.samples[index]
        image = self._image(image_path)
        label = self.split.label_map.apply(read_label(label_path), label_path)
        width, height = image.size
        if label.shape != (height, width):
            found = f"{label.shape[1]}x{label.shape[0]}"
            raise InputError(f"{label_path}: label is {found} but its image {image_path} is {width}x{height}")
        return self.joint_transform(image, label)
