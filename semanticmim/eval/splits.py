"""The one split reader of the evaluation protocols: a training and an evaluation split of one dataset,
checked once for every protocol.

Checks (each a one-line InputError): the layout suits the protocol (classification: imagefolder or
imagenet; segmentation: voc, ade20k or pairs), neither split is empty, both share one class list, there
are at least 2 classes (a one-class "classifier" has nothing to learn, and torchmetrics would fail later
with a multi-line error), and `num_classes`, when set, matches it. A split name left None picks the
conventional one among those on disk (trainaug/train/training, val/validation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from semanticmim.data.layouts import Split, available_splits, read_split
from semanticmim.errors import InputError

__all__ = ["TASK_LAYOUTS", "read_splits"]

TASK_LAYOUTS = {"classification": ("imagefolder", "imagenet"), "segmentation": ("voc", "ade20k", "pairs")}
_TRAIN_SPLITS = ("trainaug", "train", "training")  # VOC trainaug [Table 6], ADE20K training
_VAL_SPLITS = ("val", "validation")


def read_splits(task: Literal["classification", "segmentation"], layout: str, root: Path,
                train_split: str | None, val_split: str | None, num_classes: int | None,
                key: str) -> tuple[Split, Split]:
    """(train, val) of the `layout` dataset at `root` for a `task` protocol; `key` is the protocol's params
    section (e.g. "eval.linear_cls"), named in errors about its settings."""
    root, layouts = Path(root), TASK_LAYOUTS[task]
    if layout not in layouts:
        listed = f"{', '.join(layouts[:-1])} or {layouts[-1]}"
        raise InputError(f"layout {layout!r}: {task} protocols read {listed} layouts")
    if train_split is None or val_split is None:
        on_disk = available_splits(layout, root)
        train_split = train_split or _first(_TRAIN_SPLITS, on_disk, root, f"{key}.train_split")
        val_split = val_split or _first(_VAL_SPLITS, on_disk, root, f"{key}.val_split")
    train, val = (read_split(layout, root, name) for name in (train_split, val_split))
    for split in (train, val):
        if not split.samples:
            raise InputError(f"{root}: split {split.name!r} has no images")
    if val.classes != train.classes:
        unknown = sorted(set(val.classes) - set(train.classes)) or sorted(set(train.classes) - set(val.classes))
        raise InputError(f"{root}: split {val.name!r} has {len(val.classes)} classes but {train.name!r} has "
                         f"{len(train.classes)} (e.g. {unknown[:3]}); both must share the head's classes")
    if len(train.classes) < 2:
        raise InputError(f"{root}: split {train.name!r} has {len(train.classes)} class {list(train.classes)}; "
                         "a classifier needs at least 2")
    if num_classes is not None and num_classes != len(train.classes):
        raise InputError(f"{key}.num_classes={num_classes} but {root / train.name} ({layout}) has "
                         f"{len(train.classes)} classes")
    return train, val


def _first(candidates: tuple[str, ...], on_disk: list[str], root: Path, key: str) -> str:
    found = next((name for name in candidates if name in on_disk), None)
    if found is None:
        raise InputError(f"{root}: none of the splits {list(candidates)} found (splits on disk: {on_disk}); set {key}")
    return found
