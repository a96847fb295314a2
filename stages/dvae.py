"""Stage `dvae`: params.yaml `dvae` section -> runs/dvae/ (BEiT's tokenizer: ours, or OpenAI's imported).

Outputs: tokenizer.safetensors (the encoder, a `DalleTokenizer`: what BEiT pretraining reads),
model.safetensors (encoder + decoder, for drawing reconstructions), checkpoints/, metrics.json with the
held-out reconstruction error and codebook perplexity, run.json, dvclive/ curves.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import get_type_hints

import torch
from pydantic import Field, PositiveFloat, PositiveInt, create_model
from torch.utils.data import DataLoader

from semanticmim.data.layouts import ClassificationDataset, read_imagefolder
from semanticmim.data.transforms import TokenizerView, unit_range
from semanticmim.engine import distributed
from semanticmim.engine.loop import RunOptions, to_device, train
from semanticmim.engine.progress import write_json_atomic
from semanticmim.engine.recipe import Schedule
from semanticmim.methods.tasks import DVAETask
from semanticmim.settings import Strict
from semanticmim.targets.dalle import import_openai_pickle
from semanticmim.targets.dvae import DiscreteVAE, DVAEConfig, codebook_perplexity
from stages.common import run_info
from stages.params import DataParams, load_section, resolve_path

# The dVAE's own fields (its tokenizer's shape, the KL weight): the library's `DVAEConfig`, with its checks
# and defaults, flat in the section. The stage sets the config's other two from its own keys: `image_size`
# (the tokenizer view it trains on) and `temperature` (the anneal's start, `temperature_start`).
_SET_BY_THE_STAGE = ("image_size", "temperature")
_HINTS = get_type_hints(DVAEConfig, include_extras=True)
DVAEModelParams = create_model("DVAEModelParams", __base__=Strict, **{
    field.name: (_HINTS[field.name], field.default) for field in fields(DVAEConfig)
    if field.name not in _SET_BY_THE_STAGE})


class DVAEParams(DVAEModelParams):
    """The `dvae` section: our own discrete VAE tokenizer (OpenAI's weights cannot be downloaded here): the
    dVAE's fields (`DVAEModelParams`; downsampling 2^(group_count-1): 112 px -> 14x14 tokens at 4 groups)
    and how it is trained."""

    image_size: PositiveInt = 112  # the tokenizer view; half the model's image size
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    min_lr: float = Field(1e-5, ge=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    temperature_start: PositiveFloat = 1.0
    temperature_end: PositiveFloat = 1.0 / 16
    crop_scale: tuple[float, float] = (0.5, 1.0)
    data: DataParams = DataParams()
    run: RunOptions = RunOptions()
    # OpenAI's DALL-E encoder.pkl: when set, the stage imports it (unpickling it) instead of training ours
    dalle_weights: Path | None = None


def dvae_config(params: DVAEParams) -> DVAEConfig:
    """The dVAE the section describes: its own fields, the tokenizer view's side, the anneal's start."""
    shape = params.model_dump(include=set(DVAEModelParams.model_fields))
    return DVAEConfig(**shape, image_size=params.image_size, temperature=params.temperature_start)


TOKENIZER_KINDS = {"trained": "ours: the dvae stage's dVAE", "imported": "OpenAI DALL-E (imported encoder.pkl)"}


@torch.no_grad()
def tokenizer_perplexity(tokenizer, dataset, device: torch.device, limit: int = 512) -> float:
    """Codebook perplexity of the tokenizer's argmax tokens on up to `limit` validation images."""
    batches = zip(DataLoader(dataset, 64), range(limit // 64 + 1), strict=False)
    images = unit_range(torch.cat([to_device(batch, device)[0] for batch, _ in batches])[:limit])
    return codebook_perplexity(tokenizer.logits(images)).item()


def import_tokenizer(params: DVAEParams, params_file: Path, out_dir: Path, env) -> dict:
    """The tokenizer from OpenAI's weights: imported, never trained over; -> held-out perplexity."""
    pickle_path = resolve_path(params.dalle_weights, params_file)
    print(f"note: {pickle_path} is a Python pickle and will be unpickled (dvae.dalle_weights); use only a file "
          "you trust. Globals outside torch's module classes are refused.", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = import_openai_pickle(pickle_path, out_dir / "tokenizer.safetensors").to(env.device).eval()
    (out_dir / "model.safetensors").unlink(missing_ok=True)  # an earlier trained dVAE: not this tokenizer's decoder
    root = resolve_path(params.data.root, params_file)
    val_set = ClassificationDataset(read_imagefolder(root, params.data.val_split),
                                    TokenizerView(params.image_size, (1.0, 1.0), flip=0.0))
    info = run_info("dvae", {**params.model_dump(mode="json"), "tokenizer_kind": TOKENIZER_KINDS["imported"],
                             "dalle_weights_sha256": hashlib.sha256(pickle_path.read_bytes()).hexdigest()},
                    params_file, env)
    write_json_atomic(out_dir / "run.json", info)
    metrics = {"val_perplexity": tokenizer_perplexity(tokenizer, val_set, env.device)}
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def held_out_metrics(model: DiscreteVAE, dataset, device: torch.device, limit: int = 512) -> dict:
    """Reconstruction MSE of the argmax tokens, its ratio to the pixel variance (1 = no better than the
    mean image), and the codebook perplexity, on up to `limit` validation images."""
    model.eval()
    batches = zip(DataLoader(dataset, 64), range(limit // 64 + 1), strict=False)
    images = unit_range(torch.cat([to_device(batch, device)[0] for batch, _ in batches])[:limit])
    mse = torch.nn.functional.mse_loss(model.reconstruct(images), images).item()
    return {"val_recon_mse": mse, "val_recon_vs_variance": mse / images.var().item(),
            "val_perplexity": codebook_perplexity(model.encoder.logits(images)).item()}


def run(params_file: Path, out_dir: Path, quiet: bool = False, device: str = "auto",
        discard_stale: bool = False) -> dict:
    params: DVAEParams = load_section(params_file, "dvae")
    env = distributed.setup(device)
    try:
        if params.dalle_weights is not None:
            return import_tokenizer(params, params_file, out_dir, env)
        root = resolve_path(params.data.root, params_file)
        view = TokenizerView(params.image_size, params.crop_scale)
        train_set = ClassificationDataset(read_imagefolder(root, params.data.train_split), view,
                                          skip_report=out_dir / "skipped.jsonl", lazy_decode=True)
        schedule = Schedule(epochs=params.epochs, batch_size=params.batch_size, effective_batch=params.batch_size
                            * env.world_size, lr=params.lr, min_lr=params.min_lr, warmup_epochs=params.warmup_epochs,
                            weight_decay=params.weight_decay)
        torch.manual_seed(params.run.seed)
        model = DiscreteVAE.from_config(dvae_config(params))
        steps = params.epochs * (len(train_set) // (params.batch_size * env.world_size))
        task = DVAETask("dvae", model, steps, params.temperature_start, params.temperature_end)
        options = replace(params.run, discard_stale=discard_stale or params.run.discard_stale,
                          num_workers=params.data.num_workers, quiet=quiet)
        settings = hashlib.sha256(json.dumps({**params.model_dump(mode="json"), "root": str(root)},
                                             sort_keys=True).encode()).hexdigest()[:16]
        info = run_info("dvae", {**params.model_dump(mode="json"), "tokenizer_kind": TOKENIZER_KINDS["trained"]},
                        params_file, env)
        metrics = train(task, train_set, schedule, options, env, out_dir, info, settings)
        if env.is_main:
            model.encoder.save_safetensors(out_dir / "tokenizer.safetensors")
            val_set = ClassificationDataset(read_imagefolder(root, params.data.val_split),
                                            TokenizerView(params.image_size, (1.0, 1.0), flip=0.0))
            metrics.update(held_out_metrics(model, val_set, env.device))
            write_json_atomic(out_dir / "metrics.json", metrics)
        return metrics
    finally:
        distributed.teardown()
