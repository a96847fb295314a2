"""Stage `prepare`: params.yaml `data` section -> the embedded dataset, or a manifest of an external one
(a small file DVC tracks instead of hashing a million images)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from semanticmim.data.embedded import generate_embedded
from semanticmim.data.inspect import write_manifest
from semanticmim.data.linked import link_imagefolder
from semanticmim.errors import InputError
from semanticmim.settings import Strict
from stages.params import load_section, resolve_path


class DataPrepareParams(Strict):
    """The `data` section: write the embedded dataset, or a manifest of an external one."""

    kind: Literal["embedded", "imagefolder", "imagenet", "voc", "ade20k", "pairs"] = "embedded"
    out: Path = Path("data/embedded")  # embedded: the dataset folder; external: the manifest JSON
    root: Path | None = None  # external datasets only
    image_size: int = Field(64, ge=16, le=512)
    train: PositiveInt = 5000
    val: PositiveInt = 1000
    seed: int = 0
    # embedded only: an ImageFolder (ROOT/train/<class>/*, ROOT/val or ROOT/test/<class>/*) to use as the
    # classification set instead of the generated one, e.g. extracted CIFAR-10: a seeded class-balanced
    # subset of `train` + `val` images is linked (not copied) in; the segmentation set stays embedded
    classification: Path | None = None

    @model_validator(mode="after")
    def _check_root(self) -> DataPrepareParams:
        if self.kind != "embedded" and self.root is None:
            raise ValueError(f"kind {self.kind!r} needs `root`, the dataset folder")
        if self.kind != "embedded" and self.classification is not None:
            raise ValueError(f"classification: replaces the embedded classification set; kind {self.kind!r} has none")
        return self


def link_classification(source: Path, out: Path, params: DataPrepareParams) -> str:
    """Replace the embedded classification set in `out` with links into the ImageFolder `source`."""
    if not source.is_dir():
        raise InputError(f"data.classification: {source} is not a folder; expected an ImageFolder ROOT/train/<class>/*")
    val_split = "val" if (source / "val").is_dir() else "test"
    shutil.rmtree(out / "classification")
    try:
        linked = link_imagefolder(source, out / "classification",
                                  {"train": ("train", params.train), "val": (val_split, params.val)}, params.seed)
    except InputError:
        shutil.rmtree(out / "classification", ignore_errors=True)
        raise
    return (f"wrote {out}: classification = links to {linked['train']} train + {linked['val']} {val_split} images "
            f"of {source}; segmentation embedded")


def run(params_file: Path) -> str:
    params: DataPrepareParams = load_section(params_file, "data")
    out = resolve_path(params.out, params_file)
    if params.kind == "embedded":
        meta = generate_embedded(out, params.image_size, params.train, params.val, params.seed)
        if params.classification is not None:
            return link_classification(resolve_path(params.classification, params_file), out, params)
        return f"wrote {out}: {meta['splits']} images of {params.image_size} px, {len(meta['classes'])} classes"
    manifest = write_manifest(resolve_path(params.root, params_file), params.kind, out)
    return f"wrote {out}: {manifest['files']} files, splits {manifest['splits']}"
