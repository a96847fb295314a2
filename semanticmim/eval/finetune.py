"""Classification fine-tuning: paper Table 3 + the authors' code; Table 1's "IN-1K FT CLS / FT Patch".

Protocol [Table 3, BEiT/MAE fine-tuning code]: the whole encoder trains, with drop path 0.1, under
layer-wise lr decay 0.65 (`semanticmim.eval.layer_decay`, BEiT's/mmpretrain's layer ids: block b of d
gets lr × 0.65^(d+1-b), the patch embedding, every prefix token and the position embedding 0.65^(d+1),
the head 1); AdamW lr 4e-3 at batch 1024 (scaled linearly with the global batch), per-step cosine,
100 epochs; training images: bicubic random-resized crop (0.08, 1) + flip, RandAugment
`rand-m9-mstd0.5-inc1`, random erasing 0.25, then Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 on
the batch (training only; without Mixup/CutMix, label-smoothed cross-entropy); evaluation: resize
S·256/224, centre crop S, model in eval mode, top-1 and top-5 (top-5 with more than 5 classes).
Images are normalised with the encoder's own mean/std (config.json; ImageNet's by default).

Presets (`preset`; run.json's `used.preset` and `sources` say which produced a number):
- `paper` (default): Table 3 — weight decay 1e-4, no warmup, cosine to 0. Table 3 reads like a copy of
  Table 5 (same lr, wd, no warmup), so the authors' config is shipped too:
- `authors`: the authors' fine-tune configs (`configs/{beit,maskfeat}/*_cls_ft.py`) — weight decay
  0.05, 20 warmup epochs, cosine to 1e-6. They also differ in what this protocol does not reproduce
  (`AUTHORS_NOT_REPRODUCED`, written to run.json).
A value set in the params file wins over the preset.

Heads: `cls` reads the mean of the K prefix (proxy) token outputs, `patch` the mean of the patch token
outputs. `feature_norm: fresh` (default, the authors' code — mmpretrain's `avg_featmap`/`cls_token`
outputs with `final_norm=False` — as MAE/BEiT do): the last block's tokens are pooled WITHOUT the
encoder's final norm (dropped), then a new LayerNorm (eps 1e-6; the timm model's own `fc_norm` when it
has one) before the Linear; `final`: the encoder's final norm, then pool (then `fc_norm`, Identity
unless the timm model has one). Linear: MAE's init, weights N(0, 2e-5), zero bias. Table 1 has both
columns; fine-tuning the backbone for two heads at once would not be either column's protocol, so each
head listed in `heads` is its own fine-tune from the same encoder (one after the other, in
`OUT/<head>/`), and the metrics name both: `top1_cls`, `top1_patch` (+ top-5, best epochs);
`top1`/`top5` are the first listed head's.

Result `{"metrics", "run"}`: metrics = `top1`/`top5` (the LAST epoch: the headline),
`best_epoch_top1`, `best_epoch` (and `_cls`/`_patch` variants: the best epoch on the evaluation split,
labelled as such); run = every setting used with its source, the encoder's identity, each head's run.
Each `OUT/<head>/` holds the engine's outputs (checkpoints/, dvclive/ with train/* and eval/* curves,
model.safetensors = encoder + head, run.json, history.json). Runs resume like pretraining.

Evaluating a third-party timm ViT: make an export folder by hand with `config.json` =
`{"architecture": "vit_base_patch16_224", "kwargs": {"img_size": 224, "global_pool": "token"}}` and the
timm state dict (no head: `num_classes=0`) saved as `model.safetensors`, e.g.
`save_file(timm.create_model(name, pretrained=True, num_classes=0).state_dict(), "DIR/model.safetensors")`,
then `semanticmim eval finetune-cls --encoder DIR --data ROOT --format imagenet --params FILE --out OUT`.
Any timm ViT gets the same layer decay; `cls` averages all its prefix tokens (class token and registers
alike).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm.data
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from timm.data.random_erasing import RandomErasing
from torch import nn
from torch.utils.data import DataLoader, Subset

from semanticmim.data.layouts import ClassificationDataset, ClassificationSplit, SkipLog
from semanticmim.data.transforms import ClassifierEval, FinetuneTrain, build_mixup
from semanticmim.engine.distributed import DistEnv, shard_bounds
from semanticmim.engine.history import History
from semanticmim.engine.loop import Evaluation, Plan, RunOptions, autocast_for, to_device, train
from semanticmim.engine.recipe import CropScale, Recipe, check_crop_scale
from semanticmim.errors import InputError
from semanticmim.eval.encoder import Encoder, Normalization, load_encoder
from semanticmim.eval.layer_decay import layer_decay_groups, layer_lr_scales, vit_group_matcher, vit_no_weight_decay
from semanticmim.eval.linear import pool, resolved_img_size
from semanticmim.eval.metrics import (
    ClassificationAccuracy,
    fingerprint,
    progress_bar,
    protocol_result,
    top_k_names,
    value_sources,
)
from semanticmim.eval.splits import read_splits
from semanticmim.settings import Strict

Pooling = Literal["cls", "patch"]
KEY = "eval.finetune_cls"
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # Table 3, fixed in `FinetuneTrain`
RANDOM_ERASING = 0.25  # Table 3, fixed in `FinetuneTask`
LAYER_NORM_EPS = 1e-6  # the encoders' own LayerNorm eps, and MAE's/BEiT's fc_norm

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},  # the defaults below: Table 3
    "authors": {"weight_decay": 0.05, "warmup_epochs": 20.0, "min_lr": 1e-6},  # configs/*/*_cls_ft.py
}
PRESET_SOURCE = "preset authors: the authors' fine-tune configs (configs/beit/beit_cls_ft.py, " \
                "configs/maskfeat/maskfeat_cls_ft.py)"
AUTHORS_NOT_REPRODUCED = (
    "the warmup starts at lr x 1e-4 (here 0); BEiT's head init is trunc-normal 0.02 (here MAE's 2e-5, as "
    "MaskFeat's config); MaskFeat's adds ColorJitter 0.4 after RandAugment; BEiT's normalises with mean = "
    "std = 0.5 (here the encoder's own mean/std); MaskFeat's global batch is 2048 at lr 8e-3 (the same lr "
    "per image as 4e-3 at 1024, which the linear scaling gives)"
)
SOURCES = {  # where each default comes from (run.json: `sources`; "params" where the params file set it)
    "preset": "ours: the paper's Table 3 by default",
    "feature_norm": "authors' code: pooled tokens without the final norm, then a new LayerNorm (MAE/BEiT)",
    "epochs": "paper Table 3",
    "batch_size": "paper Table 3",
    "lr": "paper Table 3",
    "lr_batch": "paper Table 3",
    "min_lr": "paper Table 3: 0 (authors' code: 1e-6)",
    "warmup_epochs": "paper Table 3: 0 (authors' code: 20)",
    "weight_decay": "paper Table 3: 1e-4 (authors' code: 0.05)",
    "layer_decay": "paper Table 3",
    "drop_path": "paper Table 3",
    "label_smoothing": "paper Table 3",
    "mixup": "paper Table 3",
    "cutmix": "paper Table 3",
    "betas": "authors' code (BEiT fine-tuning)",
    "clip_grad": "ours: none (not stated)",
    "crop_scale": "paper Table 3 (timm's default crop)",
}


class Settings(Strict):
    """`eval.finetune_cls` in params.yaml: the paper's recipe by default [Table 3]."""

    preset: Literal["paper", "authors"] = "paper"  # paper: Table 3; authors: their fine-tune config (see above)
    heads: tuple[Pooling, ...] = ("cls", "patch")  # Table 1's FT CLS / FT Patch; each its own fine-tune
    feature_norm: Literal["fresh", "final"] = "fresh"  # fresh: pool raw tokens, new LayerNorm [authors' code]
    epochs: PositiveInt = 100  # Table 3
    batch_size: PositiveInt = 1024  # Table 3: global batch (accumulation makes it up)
    batch_per_device: PositiveInt | None = None  # what fits; None: batch_size / world size
    lr: PositiveFloat = 4e-3  # Table 3, AdamW; stated for `lr_batch`, scaled linearly with the global batch
    lr_batch: PositiveInt = 1024  # the batch `lr` is stated for (Table 3)
    min_lr: float = Field(0.0, ge=0.0)  # cosine floor [paper Table 3: 0]; authors' code: 1e-6
    warmup_epochs: float = Field(0.0, ge=0.0)  # [paper Table 3] 0; authors' code: 20
    weight_decay: float = Field(1e-4, ge=0.0)  # [paper Table 3] 1e-4; authors' code: 0.05
    layer_decay: float = Field(0.65, gt=0.0, le=1.0)  # Table 3
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)  # Table 3
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # Table 3
    mixup: float = Field(0.8, ge=0.0)  # Table 3: Mixup alpha (0: off)
    cutmix: float = Field(1.0, ge=0.0)  # Table 3: CutMix alpha (0: off)
    betas: tuple[float, float] = (0.9, 0.999)  # BEiT fine-tuning code
    clip_grad: PositiveFloat | None = None  # not stated: none
    crop_scale: CropScale = (0.08, 1.0)  # Table 3 (timm's default crop), bicubic, flip 0.5
    img_size: PositiveInt | None = None  # None: the encoder's own input size (224 at paper scale)
    num_classes: PositiveInt | None = None  # None: the train split's classes; else it must match them
    train_split: str = "train"
    val_split: str = "val"  # CIFAR-10's folder is "test"
    eval_every: PositiveInt = 1  # epochs between evaluations; the last epoch is always evaluated
    num_workers: NonNegativeInt = 2  # data loading processes
    run: RunOptions = RunOptions()  # seed, checkpoints, logging, amp, compile

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        """The preset's values under those the params file sets itself."""
        if isinstance(values, dict) and values.get("preset") in PRESETS:
            return {**PRESETS[values["preset"]], **values}
        return values

    @model_validator(mode="after")
    def _check(self) -> Settings:
        check_crop_scale(self.crop_scale)
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must list cls and/or patch once each, got {self.heads}")
        return self

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def per_device(self, world_size: int) -> int:
        return self.batch_per_device or max(1, self.batch_size // world_size)

    def recipe(self, world_size: int) -> Recipe:
        return Recipe(epochs=self.epochs, batch_size=self.batch_size, batch_per_device=self.per_device(world_size),
                      lr=self.lr, lr_batch=self.lr_batch, min_lr=self.min_lr, warmup_epochs=self.warmup_epochs,
                      weight_decay=self.weight_decay, betas=self.betas, clip_grad=self.clip_grad,
                      crop_scale=self.crop_scale)


# --------------------------------------------------------------------------------- model, optimizer


class Classifier(nn.Module):
    """A timm ViT with a linear head on pooled tokens: images (B, 3, H, W) -> logits (B, C).

    feature_norm "fresh": the encoder's final norm is dropped (Identity: unused parameters would stall
    DDP) and the pooled tokens go through `head_norm`, a new LayerNorm — or the timm model's own
    `fc_norm` when it has one (then its final norm already is an Identity); "final": final norm, pool,
    `fc_norm` (Identity unless the model has one)."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str, feature_norm: str = "fresh"):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        own_fc_norm = not isinstance(getattr(encoder, "fc_norm", nn.Identity()), nn.Identity)
        self.head_norm = None
        if feature_norm == "fresh":
            encoder.norm = nn.Identity()
            if not own_fc_norm:
                self.head_norm = nn.LayerNorm(encoder.embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's fine-tuning head init
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)  # (B, K + N, D), after `encoder.norm`
        prefix = self.encoder.num_prefix_tokens
        pooled = pool(tokens[:, :prefix], tokens[:, prefix:], self.pooling)
        norm = self.head_norm if self.head_norm is not None else getattr(self.encoder, "fc_norm", nn.Identity())
        return self.head(norm(pooled))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for layer decay (`semanticmim.eval.layer_decay`): stem and blocks of the encoder;
        its final norm, `fc_norm`, `head_norm` and the head on top."""
        return vit_group_matcher(self.encoder, "encoder.")

    def no_weight_decay(self) -> set[str]:
        return vit_no_weight_decay(self.encoder, "encoder.")


# ------------------------------------------------------------------------------------------- task


@dataclass
class FinetuneTask:
    """One fine-tuning step for the engine on uint8 `FinetuneTrain` views: normalise (the encoder's
    mean/std) and randomly erase on the device (timm's prefetcher order), then Mixup/CutMix and
    soft-target cross-entropy, or label-smoothed cross-entropy when both are off."""

    model: Classifier
    mixup: timm.data.Mixup | None
    label_smoothing: float
    name: str = "finetune"
    erase_prob: float = RANDOM_ERASING
    normalize: Callable[[torch.Tensor], torch.Tensor] = field(default_factory=Normalization)

    def __post_init__(self) -> None:
        self.erasing = RandomErasing(self.erase_prob, mode="pixel", max_count=1, device=self.model.head.weight.device)

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        pixels, labels = to_device(batch, self.model.head.weight.device)
        # timm's erasing and Mixup draw from Python's and numpy's RNGs: seed them from the step's torch
        # RNG (seeded by the engine from seed, step and rank) so a resumed run matches an uninterrupted one
        random.seed(int(torch.randint(0, 2**31 - 1, ())))
        images = self.erasing(self.normalize(pixels))
        if self.mixup is None:
            return F.cross_entropy(module(images).float(), labels, label_smoothing=self.label_smoothing)
        np.random.seed(int(torch.randint(0, 2**31 - 1, ())))
        images, targets = self.mixup(images, labels)  # soft targets (B, C), label smoothing included
        return torch.sum(-targets * F.log_softmax(module(images).float(), dim=-1), dim=-1).mean()

    def to(self, device: torch.device) -> FinetuneTask:
        self.erasing.device = device
        return self


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: DataLoader, num_classes: int, env: DistEnv,
                        options: RunOptions, normalize: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Top-k accuracy (%) of `model` in eval mode over `loader` (this rank's shard; counts summed over
    ranks); the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    meter = ClassificationAccuracy(num_classes, env.device, sync=env.distributed)
    with progress_bar("evaluate", env.is_main and not options.quiet) as bar:
        task = bar.add_task("evaluate", total=len(loader))
        for images, labels in loader:
            with autocast_for(env.device, options.amp):
                logits = model(normalize(images.to(env.device, non_blocking=True)))
            meter.update(logits, labels.to(env.device))
            bar.advance(task)
    model.train(was_training)
    return meter.compute()


# ------------------------------------------------------------------------------------- the protocol


def datasets(train_split, val_split, img_size: int, per_device: int, settings: Settings, out_dir: Path,
             env: DistEnv) -> tuple[ClassificationDataset, DataLoader]:
    """The augmented training set (the engine samples it) and this rank's shard of the evaluation split."""
    skipped = out_dir / "skipped.jsonl"
    train_set = ClassificationDataset(train_split, FinetuneTrain(img_size, settings.crop_scale),
                                      skip_report=skipped, lazy_decode=True)
    val_set = ClassificationDataset(val_split, ClassifierEval(img_size), skip_report=skipped, lazy_decode=True)
    bounds = shard_bounds(len(val_set), env)
    val_loader = DataLoader(Subset(val_set, range(bounds[env.rank], bounds[env.rank + 1])), batch_size=per_device,
                            num_workers=settings.num_workers, pin_memory=env.device.type == "cuda")
    return train_set, val_loader


def load(encoder_dir: Path, settings: Settings) -> Encoder:
    """The encoder to fine-tune; a bad export, an img_size off the patch grid or a `cls` head without
    prefix tokens is a one-line InputError."""
    encoder = load_encoder(encoder_dir, settings.img_size, size_key=f"{KEY}.img_size",
                           drop_path_rate=settings.drop_path)
    if "cls" in settings.heads:
        encoder.require_prefix(f"{KEY}.heads", "heads: [patch]")
    return encoder


def finetune_one(head: str, encoder: Encoder, identity: dict, settings: Settings, train_split: ClassificationSplit,
                 val_split: ClassificationSplit, out_dir: Path, env: DistEnv,
                 quiet: bool) -> tuple[History, dict, Plan]:
    """Fine-tune `encoder` with one head; returns its evaluations, the engine's metrics and the batch plan."""
    img_size, num_classes = resolved_img_size(encoder), len(train_split.classes)
    options = replace(settings.run, num_workers=settings.num_workers, quiet=quiet)
    train_set, val_loader = datasets(train_split, val_split, img_size, settings.per_device(env.world_size), settings,
                                     out_dir, env)
    schedule, plan = settings.recipe(env.world_size).plan(len(train_set), env.world_size)
    torch.manual_seed(settings.run.seed)  # the same head on every rank and every rerun
    model = Classifier(encoder.model, num_classes, head, settings.feature_norm).to(env.device)
    mixup = build_mixup(num_classes, settings.mixup, settings.cutmix, settings.label_smoothing) \
        if settings.mixes else None
    task = FinetuneTask(model, mixup, settings.label_smoothing, name=f"finetune-{head}", normalize=encoder.normalize)
    info = {"stage": f"eval finetune-cls ({head})", "settings": settings.model_dump(mode="json"),
            "encoder": encoder.identity, "world_size": env.world_size}

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        groups = layer_decay_groups(module, settings.weight_decay, settings.layer_decay)
        return torch.optim.AdamW(groups, lr=schedule.lr, betas=settings.betas, fused=env.device.type in ("cpu", "cuda"))

    def evaluate_now(_epoch: int) -> dict[str, float]:
        return evaluate_classifier(model, val_loader, num_classes, env, options, encoder.normalize)

    # the lr schedule: the engine's per-step warmup + cosine to `schedule.min_lr`, applying each group's lr_scale
    trained = train(task, train_set, schedule, options, env, out_dir, run_info=info,
                    fingerprint=fingerprint(settings, head=head, **identity), make_optimizer=make_optimizer,
                    evaluate=Evaluation(evaluate_now, settings.eval_every, "epoch"))
    return trained["history"], trained, plan


def evaluate(encoder_dir: Path, data_root: Path, layout: str, settings: Settings, out_dir: Path,
             env: DistEnv, quiet: bool) -> dict:
    """Fine-tune one model per head in `settings.heads` and evaluate each: `{"metrics", "run"}`, see the
    module docstring."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    encoder = load(encoder_dir, settings)  # up front: a bad encoder or img_size fails before any data is read
    train_split, val_split = read_splits("classification", layout, data_root, settings.train_split,
                                         settings.val_split, settings.num_classes, KEY)
    per_device = settings.per_device(env.world_size)
    if settings.mixes and per_device % 2:
        raise InputError(f"{KEY}: Mixup/CutMix pair each image with its mirror in the batch; "
                         f"the per-device batch {per_device} must be even")
    names = top_k_names(len(train_split.classes))
    identity = {"encoder": encoder.identity["sha256"], "normalization": [encoder.mean, encoder.std],
                "data": str(Path(data_root).resolve()), "format": layout}
    metrics: dict = {}
    runs: dict = {}
    depth = encoder.depth
    for index, head in enumerate(settings.heads):
        if index:  # every head fine-tunes the pretrained weights, not the previous head's
            encoder = load(encoder_dir, settings)
        history, trained, plan = finetune_one(head, encoder, identity, settings, train_split, val_split,
                                              out_dir / head, env, quiet)
        if index == 0:
            metrics.update(history.summary("", names, "top1"))
        metrics.update(history.summary("", names, "top1", suffix=f"_{head}"))
        runs[head] = {"out": str(out_dir / head), "wall_time_s": trained.get("wall_time_s", 0.0),
                      "final_loss": trained.get("final_loss"), "batch_plan": vars(plan)}
    run = {
        "notes": {"headline": "top1/top5: last epoch of the first head's fine-tune; best_epoch_*: the best epoch "
                              "on the evaluation split itself (optimistic, a diagnostic)",
                  **({"authors_preset_not_reproduced": AUTHORS_NOT_REPRODUCED} if settings.preset == "authors"
                     else {})},
        "headline_head": settings.heads[0],
        "used": used_settings(settings, encoder, depth, plan, len(train_split.classes), train_split, val_split),
        "sources": value_sources(settings, SOURCES, PRESETS[settings.preset], PRESET_SOURCE),
        "encoder": encoder.identity,
        "runs": runs,
        "timing": {"total_s": time.perf_counter() - started},
        "skipped_images": len({entry["path"] for head in settings.heads
                               for entry in SkipLog(out_dir / head / "skipped.jsonl").entries()}),
    }
    return protocol_result(metrics, run, headline=[name for name in ("top1", "top5") if name in metrics])


def used_settings(settings: Settings, encoder: Encoder, depth: int, plan: Plan, num_classes: int, train_split,
                  val_split) -> dict:
    """Every choice that produced the numbers, resolved (lr after batch scaling, layer scales, ...)."""
    img_size = resolved_img_size(encoder)
    fresh = settings.feature_norm == "fresh"
    tokens = "without the final norm, then a new LayerNorm" if fresh else "after the final norm"
    return {
        "preset": settings.preset,
        "heads": list(settings.heads),
        "feature_norm": settings.feature_norm,
        "cls_pooling": f"mean of the {encoder.num_prefix_tokens} prefix (proxy) token outputs, {tokens}",
        "patch_pooling": f"mean of the patch token outputs, {tokens}",
        "head": "Linear, init trunc-normal(0, 2e-5), zero bias",
        "normalization": {"mean": list(encoder.mean), "std": list(encoder.std)},
        "optimizer": f"AdamW betas {tuple(settings.betas)}, weight decay {settings.weight_decay} "
                     "(none on biases, norms, tokens, position embedding)",
        "lr": settings.recipe(plan.world_size).scaled_lr(plan.global_batch),
        "base_lr": settings.lr,
        "lr_batch": settings.lr_batch,
        "global_batch": plan.global_batch,
        "layer_decay": settings.layer_decay,
        "layer_lr_scales": layer_lr_scales(depth, settings.layer_decay),
        "schedule": f"per-step cosine to {settings.min_lr}, warmup {settings.warmup_epochs} epochs",
        "min_lr": settings.min_lr,
        "warmup_epochs": settings.warmup_epochs,
        "weight_decay": settings.weight_decay,
        "epochs": settings.epochs,
        "steps": plan.total_steps,
        "drop_path": settings.drop_path,
        "label_smoothing": settings.label_smoothing,
        "mixup": settings.mixup,
        "cutmix": settings.cutmix,
        "rand_augment": RAND_AUGMENT,
        "random_erasing": RANDOM_ERASING,
        "train_augmentation": f"random-resized crop {tuple(settings.crop_scale)} bicubic + flip 0.5",
        "eval_transform": f"resize {img_size * 256 // 224} bicubic + centre crop {img_size}",
        "img_size": img_size,
        "clip_grad": settings.clip_grad,
        "num_classes": num_classes,
        "encoder_depth": depth,
        "train": {"split": train_split.name, "images": len(train_split.samples)},
        "val": {"split": val_split.name, "images": len(val_split.samples)},
        "seed": settings.run.seed,
    }
