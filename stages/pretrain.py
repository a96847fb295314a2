"""Stage `pretrain@VARIANT`: params.yaml `pretrain` section -> runs/pretrain/VARIANT/.

Outputs: model.safetensors (whole pretraining model), encoder/ (timm export), checkpoints/,
metrics.json, run.json, dvclive/ curves, and for MIM variants reconstructions.png.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, PositiveInt
from torch.utils.data import default_collate

from semanticmim.data.layouts import ClassificationDataset, read_imagefolder
from semanticmim.data.loader import sample_seed, seeded_rngs
from semanticmim.data.shards import ShardDataset
from semanticmim.engine import distributed
from semanticmim.engine.loop import Evaluation, RunOptions, to_device, train
from semanticmim.errors import InputError
from semanticmim.methods import (
    METHODS,
    PretrainRecipe,
    build_task,
    build_transform,
    encoder_config,
    method,
    resolve_recipe,
)
from semanticmim.methods.registry import VariantName, recipe_sources
from semanticmim.methods.tasks import MIMTask
from semanticmim.models.export import export_timm, write_timm_export
from semanticmim.models.factory import load_model, read_model_header
from semanticmim.models.vit import EncoderShape
from semanticmim.settings import Strict
from semanticmim.targets import DalleTokenizer, HOGTarget
from semanticmim.viz.reconstruction import hog_reconstructions, token_reconstructions
from stages.common import run_info
from stages.params import DataParams, load_section, resolve_path


class HOGParams(Strict):
    nbins: PositiveInt = 9
    cell_size: PositiveInt | None = None  # None: patch_size / 2 (8 px at 16-px patches)




class PretrainParams(Strict):
    """The `pretrain` section: the encoder shape, data, run settings, targets, the profile's recipe values
    common to every variant (`recipe`: any `PretrainRecipe` field) and per-variant values
    (`variants.<name>.<field>`). What a profile leaves unset is the paper's (the method registry,
    `semanticmim.methods`). dvc.yaml tracks `recipe` and `variants.<name>` separately, so changing one
    variant reruns only that variant's stages."""

    model: EncoderShape = EncoderShape()  # the block style is the method's; K and drop path the recipe's
    data: DataParams = DataParams()
    run: RunOptions = RunOptions()
    hog: HOGParams = HOGParams()
    tokenizer: Path = Path("runs/dvae/tokenizer.safetensors")  # BEiT's dVAE (own or imported OpenAI)
    # epochs between encoder snapshots (timm exports in OUT/snapshots/epoch_NNNN) for the probe-vs-epoch
    # curve (`probe-curve` stage); the last epoch is always among them. 0: none
    snapshot_every: int = Field(0, ge=0)
    recipe: dict[str, Any] = Field(default_factory=dict)
    variants: dict[VariantName, dict[str, Any]] = Field(default_factory=dict)

    def resolve(self, variant: str, overrides: dict[str, Any] | None = None, where: str = "--set") -> PretrainRecipe:
        """The variant's recipe: the paper's (registry) <- the profile's `recipe` <- `variants[variant]`
        <- `overrides` (one run's values, e.g. an ablation point's K)."""
        method(variant)
        resolve_recipe(variant, self.recipe, location="pretrain.recipe")  # a bad common value is named as such
        own = self.variants.get(variant, {})
        recipe = resolve_recipe(variant, self.recipe, own, f"pretrain.variants.{variant}")
        if overrides:
            recipe = resolve_recipe(variant, self.recipe, {**own, **overrides}, where)
        return recipe

    def check(self) -> None:
        """Resolve every variant's recipe now, so a bad value fails before any stage runs."""
        for variant in METHODS:
            self.resolve(variant)


def pretrain_dataset(params: PretrainParams, params_file: Path, transform, out_dir: Path):
    """An ImageFolder split, or WebDataset shards written by `data prepare ... --shards`."""
    root = resolve_path(params.data.root, params_file)
    if params.data.format == "shards":
        return ShardDataset(root, transform, seed=params.run.seed)
    split = read_imagefolder(root, params.data.train_split)
    return ClassificationDataset(split, transform, skip_report=out_dir / "skipped.jsonl", lazy_decode=True)


def targets_for(variant: str, params: PretrainParams, params_file: Path, patch_size: int) -> dict:
    """The target inputs `build_task` needs: a HOGTarget, or the tokenizer (and our dVAE's decoder)."""
    target = method(variant).target
    if target == "hog":
        cell = params.hog.cell_size or patch_size // 2
        return {"hog": HOGTarget(params.hog.nbins, cell, patch_size, patch_size)}
    if target != "dvae":
        return {}
    tokenizer_path = resolve_path(params.tokenizer, params_file)
    if not tokenizer_path.is_file():
        raise InputError(f"{tokenizer_path}: tokenizer not found; run `semanticmim targets train-dvae` "
                         "or `semanticmim targets import-dalle` first (pretrain.tokenizer)")
    return {"tokenizer": DalleTokenizer.load(tokenizer_path), "decoder": dvae_beside(tokenizer_path)}


def dvae_beside(tokenizer_path: Path) -> torch.nn.Module | None:
    """Our dVAE stage writes the whole dVAE next to its tokenizer; an imported OpenAI encoder has none."""
    path = tokenizer_path.with_name("model.safetensors")
    if not path.is_file() or read_model_header(path).get("kind") != "dvae":
        return None
    return load_model(path).eval()


@torch.no_grad()
def save_reconstructions(task: MIMTask, dataset, seed: int, path: Path, count: int = 6) -> None:
    """Predictions for the masked patches of the first training images (fixed augmentation seed)."""
    if isinstance(dataset, ShardDataset):
        samples = [sample for sample, _ in zip(dataset, range(count), strict=False)]
    else:
        samples = []
        for index in range(min(count, len(dataset))):
            with seeded_rngs(sample_seed(seed, 0, index)):
                samples.append(dataset[index])
    (views, visible, masked), _labels = to_device(default_collate(samples), task.device)
    task.model.eval()
    images, target = task.targets(views)
    prediction = task.model.head(task.model.forward_pretrain(images, visible, masked))
    if task.hog is not None:
        hog_reconstructions(images, visible, masked, target, prediction, task.hog, path)
    else:
        token_reconstructions(images, visible, masked, target, prediction, path, task.decoder)


def fingerprint_of(variant: str, params: PretrainParams, recipe: PretrainRecipe, params_file: Path) -> str:
    """What a checkpoint must share with a run to be resumed by it: variant, recipe, model, data, seed,
    target settings and the tokenizer's content."""
    settings = {"variant": variant, "recipe": asdict(recipe),
                **params.model_dump(mode="json", include={"model", "data", "hog"})}
    settings["run"] = {"seed": params.run.seed}
    settings["snapshot_every"] = params.snapshot_every  # a finished run has no snapshots it was not asked for
    settings["data"] = {"root": str(resolve_path(params.data.root, params_file)), "split": params.data.train_split}
    tokenizer = resolve_path(params.tokenizer, params_file)
    if method(variant).target == "dvae" and tokenizer.is_file():
        settings["tokenizer_sha256"] = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=list).encode()).hexdigest()[:16]


def tokenizer_identity(variant: str, params: PretrainParams, params_file: Path) -> dict | None:
    """Which tokenizer a BEiT run predicts: its sha256 and kind (our dVAE stage's, or an imported one)."""
    if method(variant).target != "dvae":
        return None
    path = resolve_path(params.tokenizer, params_file)
    beside = path.with_name("run.json")  # the dvae stage records which tokenizer it wrote
    recorded = json.loads(beside.read_text()).get("params", {}).get("tokenizer_kind") if beside.is_file() else None
    kind = recorded or "unknown: no run.json of the dvae stage beside it"
    return {"path": str(params.tokenizer), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "kind": kind}


SNAPSHOTS = "snapshots"


def snapshot_hook(task, every: int, out_dir: Path, env) -> Evaluation | None:
    """Every `every` epochs (and at the last), the encoder as a timm export into the checkpoints folder's
    snapshots/ (kept with the checkpoints, so a resumed or rerun stage still has them all)."""
    if not every:
        return None

    def snapshot(epoch: int) -> dict[str, float]:
        if env.is_main:
            write_timm_export(task.model.encoder, out_dir / "checkpoints" / SNAPSHOTS / f"epoch_{epoch:04d}")
        return {}

    return Evaluation(snapshot, every, "epoch")


def publish_snapshots(out_dir: Path) -> None:
    """OUT/snapshots/ (a DVC output, empty without snapshots) = the snapshots beside the checkpoints."""
    kept, published = out_dir / "checkpoints" / SNAPSHOTS, out_dir / SNAPSHOTS
    shutil.rmtree(published, ignore_errors=True)
    if kept.is_dir():
        shutil.copytree(kept, published)
    published.mkdir(parents=True, exist_ok=True)


def decay_everything(recipe: PretrainRecipe, device: torch.device):
    """Official MoCo v3: AdamW decays every parameter (no exclusions); None: the engine's default groups."""
    if not recipe.decay_all:
        return None
    return lambda model: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0,
                                           betas=recipe.betas, eps=recipe.eps, weight_decay=recipe.weight_decay,
                                           fused=device.type in ("cpu", "cuda"))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["num_proxy=4", "mask_ratio=0.5"]` -> `{"num_proxy": 4, "mask_ratio": 0.5}` (values read as YAML
    scalars); the recipe's validation then checks names and values."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. num_proxy=4")
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise InputError(f"--set {item!r}: {text!r} is not a YAML value") from None
    return overrides


def run(variant: str, params_file: Path, out_dir: Path, quiet: bool = False, device: str = "auto",
        discard_stale: bool = False, overrides: dict[str, Any] | None = None, seed: int | None = None) -> dict:
    """Pretrain `variant` with the profile's recipe, `overrides` on top (an ablation point) and, when given,
    `seed` instead of `pretrain.run.seed` (a seed of the seeds axis)."""
    params = load_section(params_file, "pretrain")
    if seed is not None:
        params = params.model_copy(update={"run": replace(params.run, seed=seed)})
    recipe = params.resolve(variant, overrides)
    env = distributed.setup(device)
    try:
        encoder = encoder_config(method(variant), params.model, recipe)
        transform = build_transform(variant, recipe, encoder.img_size, encoder.num_patches)
        dataset = pretrain_dataset(params, params_file, transform, out_dir)
        schedule, plan = recipe.plan(len(dataset), env.world_size)
        targets = targets_for(variant, params, params_file, encoder.patch_size)
        # seeded after the targets are built, so the initial weights depend on the seed alone
        torch.manual_seed(params.run.seed)  # the same initial weights on every rank and every rerun
        task = build_task(variant, encoder, recipe, plan.total_steps, **targets).to(env.device)
        options = replace(params.run, discard_stale=discard_stale or params.run.discard_stale,
                          num_workers=params.data.num_workers, quiet=quiet)
        sources = recipe_sources(variant, params.recipe, params.variants.get(variant, {}))
        sources.update(dict.fromkeys(overrides or {}, "--set (this run)"))
        used = params.model_copy(update={"run": options}).model_dump(mode="json")  # the options actually used
        info = run_info(f"pretrain@{variant}", {**used, "resolved_recipe": asdict(recipe),
                        "overrides": overrides or {},
                        "tokenizer_identity": tokenizer_identity(variant, params, params_file),
                        "recipe_sources": sources, "lr_scaled": schedule.lr}, params_file, env)
        fingerprint = fingerprint_of(variant, params, recipe, params_file)
        metrics = train(task, dataset, schedule, options, env, out_dir, info, fingerprint,
                        make_optimizer=decay_everything(recipe, env.device),
                        evaluate=snapshot_hook(task, params.snapshot_every, out_dir, env))
        metrics.pop("history", None)
        if env.is_main:
            export_timm(out_dir / "model.safetensors", out_dir / "encoder")
            publish_snapshots(out_dir)
            if isinstance(task, MIMTask):
                save_reconstructions(task, dataset, params.run.seed, out_dir / "reconstructions.png")
        return metrics
    finally:
        distributed.teardown()
