"""`semanticmim bench --loop`: whole training steps (data loading, targets, forward/backward, optimizer)
of every variant through the real pretrain stage, one epoch each, with the share of time per phase."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from semanticmim.methods import METHODS
from stages import pretrain
from stages.params import read_section, resolve_path


def run(params_file: Path, variants: list[str] | None, device: str, epochs: int = 1) -> list[dict]:
    """Pretrain each variant for `epochs` epochs in a temp folder with phase profiling on."""
    section = read_section(params_file, "pretrain")
    section = {**section, "recipe": {**section.get("recipe", {}), "epochs": epochs},
               "run": {**section.get("run", {}), "profile": True, "checkpoint_every": 10**9, "log_every": 10**9}}
    section["variants"] = {name: {k: v for k, v in spec.items() if k != "epochs"}
                           for name, spec in section.get("variants", {}).items()}
    for key in ("tokenizer",):
        section[key] = str(resolve_path(Path(section.get(key, "runs/dvae/tokenizer.safetensors")), params_file))
    section["data"] = {**section.get("data", {}), "root": str(resolve_path(
        Path(section.get("data", {}).get("root", "data/embedded/classification")), params_file))}
    records = []
    with tempfile.TemporaryDirectory(prefix="semanticmim-bench-") as folder:
        params = Path(folder) / "params.yaml"
        params.write_text(yaml.safe_dump({"pretrain": section}))
        for variant in variants or list(METHODS):
            metrics = pretrain.run(variant, params, Path(folder) / variant, quiet=True, device=device)
            share = metrics["time_share"]
            records.append({"variant": variant, "device": device, "steps": metrics["steps"],
                            "img_per_s": round(metrics["img_per_s"], 1), "time_share": share,
                            "data_share": share.get("data"),
                            "engine_overhead_share": round(share.get("other", 0.0), 4)})
    return records
