"""Stage `prepare`: params.yaml `data` section -> the embedded dataset, or a manifest of an external one
(a small file DVC tracks instead of hashing a million images)."""

from __future__ import annotations

from pathlib import Path

from semanticmim.config import DataPrepareParams, load_section, resolve_path
from semanticmim.data.embedded import generate_embedded
from semanticmim.data.inspect import write_manifest


def run(params_file: Path) -> str:
    params: DataPrepareParams = load_section(params_file, "data")
    out = resolve_path(params.out, params_file)
    if params.kind == "embedded":
        meta = generate_embedded(out, params.image_size, params.train, params.val, params.seed)
        return f"wrote {out}: {meta['splits']} images of {params.image_size} px, {len(meta['classes'])} classes"
    manifest = write_manifest(resolve_path(params.root, params_file), params.kind, out)
    return f"wrote {out}: {manifest['files']} files, splits {manifest['splits']}"
