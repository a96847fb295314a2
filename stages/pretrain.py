"""Stage `pretrain@VARIANT`: params.yaml `pretrain` section -> runs/pretrain/VARIANT/.

Outputs: model.safetensors (whole pretraining model), encoder/ (timm export), checkpoints/,
metrics.json, run.json, dvclive/ curves, and for MIM variants reconstructions.png.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch.utils.data import default_collate

from semanticmim.config import PretrainParams, Recipe, load_section, resolve_path
from semanticmim.data.layouts import ClassificationDataset, read_imagefolder
from semanticmim.data.loader import sample_seed, seeded_rngs
from semanticmim.data.shards import ShardDataset
from semanticmim.data.transforms import BeitTwoView, CropFlip, MocoTwoView
from semanticmim.engine import distributed
from semanticmim.engine.loop import RunOptions, Schedule, plan_batches, train
from semanticmim.engine.tasks import MIMTask, MoCoTask, WithMasks, to_device
from semanticmim.errors import InputError
from semanticmim.models import VARIANTS, EncoderConfig, MaskGenerator, build_variant
from semanticmim.models.export import export_timm
from semanticmim.models.factory import hog_dim, load_model, read_model_header
from semanticmim.models.mocov3 import MoCoConfig, MoCoV3
from semanticmim.targets import DalleTokenizer, HOGTarget
from semanticmim.viz.reconstruction import hog_reconstructions, token_reconstructions
from stages.common import run_info


def pretrain_transform(variant: str, recipe: Recipe, img_size: int):
    """The variant's augmentation (DESIGN §3): BEiT two views, MaskFeat crop+flip, MoCo v3 two views."""
    if variant.startswith("beit"):
        return BeitTwoView(img_size, recipe.crop_scale, recipe.color_jitter, recipe.hflip)
    if variant.startswith("maskfeat"):
        return CropFlip(img_size, recipe.crop_scale, recipe.hflip)
    return MocoTwoView(img_size, recipe.crop_scale)


def pretrain_dataset(params: PretrainParams, params_file: Path, transform, out_dir: Path):
    """An ImageFolder split, or WebDataset shards written by `data prepare ... --shards`."""
    root = resolve_path(params.data.root, params_file)
    if params.data.format == "shards":
        return ShardDataset(root, transform, seed=params.run.seed)
    split = read_imagefolder(root, params.data.train_split)
    return ClassificationDataset(split, transform, skip_report=out_dir / "skipped.jsonl", lazy_decode=True)


def build_task(variant: str, params: PretrainParams, recipe: Recipe, params_file: Path, total_steps: int):
    encoder = EncoderConfig(block=VARIANTS[variant].block, num_proxy=recipe.num_proxy or 1, **params.model.model_dump())
    if variant == "mocov3":
        model = MoCoV3(MoCoConfig(encoder, recipe.mlp_dim, recipe.out_dim, recipe.temperature))
        return MoCoTask(variant, model, total_steps, recipe.base_momentum)
    if VARIANTS[variant].target == "hog":
        cell = params.hog.cell_size or encoder.patch_size // 2
        hog = HOGTarget(params.hog.nbins, cell, encoder.patch_size, encoder.patch_size)
        model = build_variant(variant, encoder, recipe.num_proxy, hog_dim(encoder.patch_size, cell, params.hog.nbins))
        return MIMTask(variant, model, hog=hog)
    tokenizer_path = resolve_path(params.tokenizer, params_file)
    if not tokenizer_path.is_file():
        raise InputError(f"{tokenizer_path}: tokenizer not found; run `semanticmim targets train-dvae` "
                         "or `semanticmim targets import-dalle` first (pretrain.tokenizer)")
    tokenizer = DalleTokenizer.load(tokenizer_path)
    model = build_variant(variant, encoder, recipe.num_proxy, tokenizer.vocab_size)
    return MIMTask(variant, model, tokenizer=tokenizer, decoder=dvae_beside(tokenizer_path))


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


def settings_fingerprint(variant: str, params: PretrainParams, recipe: Recipe, params_file: Path) -> str:
    """What a checkpoint must share with a run to be resumed by it: variant, recipe, model, data, seed,
    target settings and the tokenizer's content."""
    settings = {"variant": variant, "recipe": recipe.model_dump(mode="json"),
                **params.model_dump(mode="json", include={"model", "data", "hog", "run"})}
    settings["run"] = {"seed": params.run.seed}
    settings["data"] = {"root": str(resolve_path(params.data.root, params_file)), "split": params.data.train_split}
    tokenizer = resolve_path(params.tokenizer, params_file)
    if VARIANTS[variant].target == "dvae" and tokenizer.is_file():
        settings["tokenizer_sha256"] = hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run(variant: str, params_file: Path, out_dir: Path, quiet: bool = False, device: str = "auto",
        discard_stale: bool = False) -> dict:
    params = load_section(params_file, "pretrain")
    recipe = params.recipe(variant)
    env = distributed.setup(device)
    try:
        transform = pretrain_transform(variant, recipe, params.model.img_size)
        if recipe.mask_ratio is not None:
            num_patches = (params.model.img_size // params.model.patch_size) ** 2
            transform = WithMasks(transform, MaskGenerator(num_patches, recipe.mask_ratio, recipe.img_mask_ratio))
        dataset = pretrain_dataset(params, params_file, transform, out_dir)
        schedule = Schedule(
            epochs=recipe.epochs, batch_size=recipe.batch_size, effective_batch=recipe.effective_batch,
            lr=0.0, min_lr=recipe.min_lr, warmup_epochs=recipe.warmup_epochs, weight_decay=recipe.weight_decay,
            betas=recipe.betas, eps=recipe.eps, clip_grad=recipe.clip_grad,
        )
        plan = plan_batches(schedule, len(dataset), env.world_size)
        schedule = Schedule(**{**vars(schedule), "lr": recipe.scaled_lr(plan.global_batch)})
        torch.manual_seed(params.run.seed)  # the same initial weights on every rank and every rerun
        task = build_task(variant, params, recipe, params_file, plan.total_steps).to(env.device)
        options = RunOptions(**{**params.run.model_dump(), "discard_stale": discard_stale or params.run.discard_stale},
                             num_workers=params.data.num_workers, quiet=quiet)
        info = run_info(f"pretrain@{variant}", {**params.model_dump(mode="json"), "resolved_recipe":
                        recipe.model_dump(mode="json"), "lr_scaled": schedule.lr}, params_file, env)
        fingerprint = settings_fingerprint(variant, params, recipe, params_file)
        metrics = train(task, dataset, schedule, options, env, out_dir, info, fingerprint)
        if env.is_main:
            export_timm(out_dir / "model.safetensors", out_dir / "encoder")
            if isinstance(task, MIMTask):
                save_reconstructions(task, dataset, params.run.seed, out_dir / "reconstructions.png")
        return metrics
    finally:
        distributed.teardown()
