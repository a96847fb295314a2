"""Dataset inspection and manifests: is a dataset on disk usable, and has it changed?

`inspect_dataset` reads every image (and every segmentation label) of every split once, in a thread
pool, and reports counts, classes, image-size statistics, the unreadable files that training would
skip, and the problems that would stop it (label values outside the class range, label/image size
mismatches). Layout errors surface as the readers' one-line `InputError`.

`write_manifest` describes an external dataset in a small JSON file that DVC can track instead of
hashing a million images: per-split file counts, the classes and a cheap content fingerprint over
the sorted relative paths, sizes and mtimes (whole seconds, so that copies made with `tar`/`rsync -a`
keep it) of every file the splits use. The manifest holds no timestamp of its own, so writing it
again for an unchanged dataset gives the same bytes and DVC reruns nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from semanticmim.data.decode import UnreadableImage, load_rgb
from semanticmim.data.layouts import (
    ClassificationSplit,
    LabelMap,
    SegmentationSplit,
    _tree,
    available_splits,
    read_label,
    read_split,
)
from semanticmim.errors import InputError

__all__ = ["DatasetReport", "dataset_fingerprint", "inspect_dataset", "write_manifest"]

MANIFEST_VERSION = 1
_CHUNK = 2048  # samples in flight at once: bounds memory on ImageNet-sized splits

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class DatasetReport:
    """What `inspect_dataset` found. `images` counts readable images over all splits."""

    layout: str
    root: str
    classes: list[str]
    splits: dict[str, dict[str, int]]  # split → {"listed", "images" (readable), "skipped"}
    image_size: dict[str, Any]  # min/max/mean (width, height) and the most common size
    skipped: list[dict[str, str]] = field(default_factory=list)  # [{path, reason}]
    problems: list[str] = field(default_factory=list)  # each makes the dataset unusable

    @property
    def images(self) -> int:
        return sum(split["images"] for split in self.splits.values())

    @property
    def usable(self) -> bool:
        return not self.problems and all(split["images"] > 0 for split in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; `classes` is the number of classes, `class_names` the names."""
        report = asdict(self)
        report["class_names"] = report.pop("classes")
        report = {"format": report.pop("layout"), **report}  # the key is the CLI's word (`--format`)
        return {"images": self.images, "classes": len(self.classes), "usable": self.usable, **report}


@dataclass(frozen=True)
class _Checked:
    size: tuple[int, int] | None  # (width, height) of a readable image
    skipped: dict[str, str] | None = None
    problem: str | None = None


def inspect_dataset(
    root: str | Path,
    layout: str,
    splits: list[str] | None = None,
    workers: int = 8,
    progress: Callable[[int], None] | None = None,
    **reader_options: Any,
) -> DatasetReport:
    """Read every file of `splits` (default: all found) of the `layout` dataset at `root` and report.

    progress: called with the number of samples just checked (for a progress bar).
    reader_options: passed to the layout reader (e.g. `void_label` for `pairs`).
    """
    chosen = _splits(layout, root, splits)
    read = [read_split(layout, root, name, **reader_options) for name in chosen]
    split_stats: dict[str, dict[str, int]] = {}
    sizes: list[tuple[int, int]] = []
    skipped: list[dict[str, str]] = []
    problems: list[str] = []
    for split in read:
        checks = list(_map_threaded(_checker(split), split.samples, workers, progress))
        readable = [check.size for check in checks if check.size is not None]
        split_skipped = [check.skipped for check in checks if check.skipped is not None]
        split_stats[split.name] = {"listed": len(checks), "images": len(readable), "skipped": len(split_skipped)}
        sizes += readable
        skipped += split_skipped
        problems += [check.problem for check in checks if check.problem is not None]
        if not readable:
            problems.append(f"{split.root}: split {split.name!r} has no readable images")
    return DatasetReport(layout, str(root), list(read[0].classes), split_stats, _size_stats(sizes), skipped, problems)


def _splits(layout: str, root: str | Path, splits: list[str] | None) -> list[str]:
    chosen = splits or available_splits(layout, root)
    if not chosen:
        raise InputError(f"{root}: no splits found for layout {layout!r}; expected {_tree(layout)}")
    return chosen


def _checker(split: ClassificationSplit | SegmentationSplit) -> Callable[[tuple[str, Any]], _Checked]:
    if isinstance(split, SegmentationSplit):
        return lambda sample: _check_segmentation(sample[0], sample[1], split.label_map)
    return lambda sample: _check_image(sample[0])


def _check_image(path: str) -> _Checked:
    try:
        return _Checked(load_rgb(path).size)
    except UnreadableImage as error:
        return _Checked(None, skipped={"path": str(error.path), "reason": error.reason})


def _check_segmentation(image_path: str, label_path: str, label_map: LabelMap) -> _Checked:
    checked = _check_image(image_path)
    if checked.size is None:
        return checked
    try:
        raw = read_label(label_path)
        label_map.apply(raw, label_path)
    except UnreadableImage as error:
        return _Checked(None, skipped={"path": str(error.path), "reason": error.reason})
    except InputError as error:
        return _Checked(checked.size, problem=str(error))
    if raw.shape != checked.size[::-1]:
        width, height = checked.size
        return _Checked(
            checked.size, problem=f"{label_path}: label is {raw.shape[1]}x{raw.shape[0]}, image {width}x{height}"
        )
    return checked


def _map_threaded(
    function: Callable[[T], R], items: list[T], workers: int, progress: Callable[[int], None] | None
) -> Iterator[R]:
    """`map(function, items)` on a thread pool (PIL decodes without the GIL), chunk by chunk, in order."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            yield from pool.map(function, chunk)
            if progress is not None:
                progress(len(chunk))


def _size_stats(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    if not sizes:
        return {}
    array = np.array(sizes)
    return {
        "min": array.min(0).tolist(),
        "max": array.max(0).tolist(),
        "mean": np.round(array.mean(0), 1).tolist(),
        "most_common": list(Counter(sizes).most_common(1)[0][0]),
    }


# ------------------------------------------------------------------------------------------ manifests


def write_manifest(
    root: str | Path,
    layout: str,
    out: str | Path,
    splits: list[str] | None = None,
    workers: int = 8,
    **reader_options: Any,
) -> dict[str, Any]:
    """Describe the `layout` dataset at `root` in the JSON file `out` (atomically) and return it.

    Only file metadata is read (no decoding), so this is cheap enough to run on every `dvc repro`.
    """
    root = Path(root)
    read = [read_split(layout, root, name, **reader_options) for name in _splits(layout, root, splits)]
    files = sorted({path for split in read for sample in split.samples for path in _sample_files(sample)})
    fingerprint, total_bytes = dataset_fingerprint(root, files, workers)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": layout,  # the manifests' key since version 1 (DVC tracks their bytes)
        "root": str(root),
        "classes": list(read[0].classes),
        "splits": {split.name: {"samples": len(split.samples)} for split in read},
        "files": len(files),
        "bytes": total_bytes,
        "fingerprint": fingerprint,
    }
    _write_json_atomic(Path(out), manifest)
    return manifest


def _sample_files(sample: tuple[str, Any]) -> Iterable[str]:
    return [sample[0], sample[1]] if isinstance(sample[1], str) else [sample[0]]


def dataset_fingerprint(root: str | Path, files: list[str], workers: int = 8) -> tuple[str, int]:
    """sha256 over `relative path, size, mtime (s)` of `files` in sorted order, and their total bytes."""
    root = Path(root)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        stats = list(pool.map(os.stat, files))
    digest = hashlib.sha256()
    for path, stat in zip(files, stats, strict=True):
        relative = Path(path).relative_to(root).as_posix()
        digest.update(f"{relative}\t{stat.st_size}\t{int(stat.st_mtime)}\n".encode())
    return f"sha256:{digest.hexdigest()}", sum(stat.st_size for stat in stats)


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
