"""Stages `floor-random-init` and `floor-raw-pixels`: what a Table 1 number is worth.

- random-init: an encoder of the profile's shape with the proxies of `report.floors.like` (a variant),
  seeded and never trained, exported like a pretrained one (`runs/pretrain/random-init/encoder`), so the
  evaluation matrix and the attention analysis treat it as any other encoder.
- raw-pixels: the linear probe's recipe (`eval.linear_cls`: epochs, batch, lr, weight decay) on raw
  pixels (`semanticmim.eval.pixels`), for the classification columns.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import PositiveInt

from semanticmim.engine import distributed
from semanticmim.engine.progress import write_json_atomic
from semanticmim.eval import linear, pixels
from semanticmim.methods import build_variant, encoder_config, method
from semanticmim.methods.registry import VariantName
from semanticmim.models.export import export_timm
from semanticmim.serialization import save_model
from semanticmim.settings import Strict
from stages.common import run_info
from stages.evaluate import read_data
from stages.params import load_section, read_section, validate

PROBE_KEYS = ("epochs", "batch_size", "lr", "lr_batch", "weight_decay", "eval_every", "num_workers", "train_split",
              "val_split")


class FloorParams(Strict):
    """`report.floors`."""

    like: VariantName = "maskfeat-semanticmim"  # the random-init encoder has this variant's block style and K
    seed: int = 0
    pixels_img_size: PositiveInt = 32  # the raw-pixel probe's input: 3·S² features


def floor_params(params_file: Path) -> FloorParams:
    values = read_section(params_file, "report").get("floors") or {}
    return validate(FloorParams, values, params_file, "report.floors")


def random_init(params_file: Path, out_dir: Path) -> dict:
    """-> out_dir/{model.safetensors, encoder/, run.json}: a seeded, untrained encoder."""
    floors = floor_params(params_file)
    pretrain = load_section(params_file, "pretrain")
    recipe = pretrain.resolve(floors.like)
    encoder = encoder_config(method(floors.like), pretrain.model, recipe)
    torch.manual_seed(floors.seed)
    model = build_variant(floors.like, encoder, recipe=recipe)
    save_model(model, out_dir / "model.safetensors")
    config = export_timm(out_dir / "model.safetensors", out_dir / "encoder")
    info = run_info("floor-random-init", {"like": floors.like, "seed": floors.seed, "encoder": encoder.to_dict()},
                    params_file, distributed.DistEnv())
    write_json_atomic(out_dir / "run.json", info)
    return config


def raw_pixels(params_file: Path, out_dir: Path, quiet: bool = False) -> dict:
    """-> out_dir/{metrics.json, run.json}: the linear probe's recipe on raw pixels."""
    floors = floor_params(params_file)
    probe = dict(read_section(params_file, "eval").get("linear_cls") or {})
    data_root, layout = read_data(probe, params_file, "linear_cls", None, None)
    linear_settings = validate(linear.Settings, probe, params_file, "eval.linear_cls")  # the probe's own checks
    values = {k: getattr(linear_settings, k) for k in PROBE_KEYS if k in probe}
    settings = validate(pixels.Settings, {"img_size": floors.pixels_img_size, **values}, params_file,
                        "eval.linear_cls")
    env = distributed.setup("cpu")
    try:
        results = pixels.evaluate(data_root, layout, settings, out_dir, env, quiet)
        write_json_atomic(out_dir / "metrics.json", results["metrics"])
        write_json_atomic(out_dir / "run.json", run_info("floor-raw-pixels", {
            "settings": settings.model_dump(mode="json"), "data": {"root": str(data_root), "format": layout},
            **results["run"]}, params_file, env))
        return results["metrics"]
    finally:
        distributed.teardown()
