"""Stage `prepare`: params.yaml `data` section -> the embedded dataset, or a manifest of an external one
(a small file DVC tracks instead of hashing a million images)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from semanticmim.data.embedded import generate_embedded
from semanticmim.data.inspect import write_manifest
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

    @model_validator(mode="after")
    def _check_root(self) -> DataPrepareParams:
        if self.kind != "embedded" and self.root is None:
            raise ValueError(f"kind {self.kind!r} needs `root`, the dataset folder")
        return self


def run(params_file: Path) -> str:
    params: DataPrepareParams = load_section(params_file, "data")
    out = resolve_path(params.out, params_file)
    if params.kind == "embedded":
        meta = generate_embedded(out, params.image_size, params.train, params.val, params.seed)
        return f"wrote {out}: {meta['splits']} images of {params.image_size} px, {len(meta['classes'])} classes"
    manifest = write_manifest(resolve_path(params.root, params_file), params.kind, out)
    return f"wrote {out}: {manifest['files']} files, splits {manifest['splits']}"
