"""Stage `eval`: one protocol of the paper's Table 1 on one timm-format encoder.

Each protocol module (`semanticmim/eval/...`) exposes `Settings` (its params, paper defaults) and
`evaluate(encoder_dir, data_root, data_format, settings, out_dir, env, quiet) -> metrics`. This stage
reads `eval.<protocol>` from the params file, runs it, and writes `metrics.json` with the protocol's
full settings and the encoder's identity next to the numbers.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from semanticmim.config import read_section, validate
from semanticmim.engine import distributed
from semanticmim.engine.progress import write_json_atomic
from semanticmim.errors import InputError

PROTOCOLS = {
    "linear-cls": "semanticmim.eval.linear",
    "finetune-cls": "semanticmim.eval.finetune",
    "linear-seg": "semanticmim.eval.segmentation.linear",
    "finetune-seg": "semanticmim.eval.segmentation.upernet",
}
FORMATS = ("imagefolder", "imagenet", "voc", "ade20k", "pairs")


def run(protocol: str, encoder_dir: Path, data_root: Path, data_format: str, params_file: Path, out_dir: Path,
        quiet: bool = False, device: str = "auto", discard_stale: bool = False) -> dict:
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    if data_format not in FORMATS:
        raise InputError(f"unknown --format {data_format!r}; expected one of {FORMATS}")
    module = importlib.import_module(PROTOCOLS[protocol])
    key = protocol.replace("-", "_")
    values = read_section(params_file, "eval").get(key) or {}
    settings = validate(module.Settings, values, params_file, f"eval.{key}")
    if discard_stale:
        settings = settings.model_copy(update={"run": settings.run.model_copy(update={"discard_stale": True})})
    env = distributed.setup(device)
    try:
        metrics = module.evaluate(encoder_dir, data_root, data_format, settings, out_dir, env, quiet)
        metrics = {**metrics, "protocol": protocol, "settings": settings.model_dump(mode="json"),
                   "data": {"root": str(data_root), "format": data_format}}
        if env.is_main:
            write_json_atomic(out_dir / "metrics.json", metrics)
        return metrics
    finally:
        distributed.teardown()
