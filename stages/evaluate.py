"""Stage `eval@ENCODER-PROTOCOL`: one protocol of the paper's Table 1 on one timm-format encoder.

Each protocol module (`semanticmim/eval/...`) exposes `Settings` (its params, paper defaults) and
`evaluate(encoder_dir, data_root, layout, settings, out_dir, env, quiet) -> {"metrics", "run"}`
(numbers only; everything else). This stage
reads `eval.<protocol>` from the params file — its `data: {root, format}` says what to evaluate on, the
rest is the protocol's settings —, runs it, and writes `metrics.json` (numbers only, what `dvc metrics`
shows) and `run.json` (the resolved settings, the encoder's identity, the data, versions and commit).
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Literal

from semanticmim.data.layouts import LAYOUTS
from semanticmim.engine import distributed
from semanticmim.engine.progress import write_json_atomic
from semanticmim.errors import InputError
from semanticmim.settings import Strict
from stages.common import run_info
from stages.params import read_section, resolve_path, validate

PROTOCOLS = {
    "linear-cls": "semanticmim.eval.linear",
    "finetune-cls": "semanticmim.eval.finetune",
    "linear-seg": "semanticmim.eval.segmentation.linear",
    "finetune-seg": "semanticmim.eval.segmentation.upernet",
}


class EvalData(Strict):
    """`eval.<protocol>.data`: the dataset a protocol reads (paths relative to the project root)."""

    root: Path
    format: Literal[LAYOUTS]  # the dataset's layout (`semanticmim.data.layouts`)


def protocol_name(protocol: str) -> str:
    """`linear-cls` and `linear_cls` (its params key, the DAG's matrix axis) name the same protocol."""
    name = protocol.replace("_", "-")
    if name not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    return name


def read_data(values: dict, params_file: Path, key: str, data_root: Path | None,
              layout: str | None) -> tuple[Path, str]:
    """The dataset and its layout: `--data/--format` when given, else the params' `eval.<protocol>.data`."""
    given = values.pop("data", None)
    if data_root is not None and layout is not None:
        if layout not in LAYOUTS:
            raise InputError(f"unknown --format {layout!r}; expected one of {LAYOUTS}")
        return data_root, layout
    if given is None:
        raise InputError(f"{params_file}: eval.{key} has no `data: {{root, format}}`; add it or give --data and "
                         "--format")
    data = validate(EvalData, given, params_file, f"eval.{key}.data")
    return (data_root or resolve_path(data.root, params_file)), (layout or data.format)


def run(protocol: str, encoder_dir: Path, data_root: Path | None, layout: str | None, params_file: Path,
        out_dir: Path, quiet: bool = False, device: str = "auto", discard_stale: bool = False) -> dict:
    protocol = protocol_name(protocol)
    module = importlib.import_module(PROTOCOLS[protocol])
    key = protocol.replace("-", "_")
    values = dict(read_section(params_file, "eval").get(key) or {})
    data_root, layout = read_data(values, params_file, key, data_root, layout)
    settings = validate(module.Settings, values, params_file, f"eval.{key}")
    if discard_stale:
        settings = settings.model_copy(update={"run": replace(settings.run, discard_stale=True)})
    env = distributed.setup(device)
    try:
        results = module.evaluate(encoder_dir, data_root, layout, settings, out_dir, env, quiet)
        metrics, details = results["metrics"], results["run"]  # the protocols' contract: numbers, the rest
        if env.is_main:
            info = run_info(f"eval {protocol}", {"settings": settings.model_dump(mode="json"), **details,
                                                "data": {"root": str(data_root), "format": layout},
                                                "encoder_dir": str(encoder_dir)}, params_file, env)
            write_json_atomic(out_dir / "run.json", info)
            write_json_atomic(out_dir / "metrics.json", metrics)
        return {"metrics": metrics, "run": details}
    finally:
        distributed.teardown()
