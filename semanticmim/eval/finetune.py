"""Classification fine-tuning: paper Table 3 + the authors' code; Table 1's "IN-1K FT CLS / FT Patch".

Protocol [Table 3, BEiT/MAE fine-tuning code]: the whole encoder trains, with drop path 0.1, under
layer-wise lr decay 0.65 (timm's `param_groups_layer_decay` with BEiT's/mmpretrain's layer ids, see
`Classifier.group_matcher`: block b of d gets lr × 0.65^(d+1-b), the patch embedding, tokens and
position embedding 0.65^(d+1), the final norm and the head 1); AdamW lr 4e-3 at batch 1024 (scaled
linearly with the global batch), weight decay 1e-4 [paper] (authors' code 0.05), warmup 0 epochs
[paper] (authors' code 20), per-step cosine, 100 epochs; training images: bicubic random-resized
crop (0.08, 1) + flip, RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25, then Mixup 0.8 /
CutMix 1.0 with label smoothing 0.1 on the batch (training only; without Mixup/CutMix,
label-smoothed cross-entropy); evaluation: resize S·256/224, centre crop S, model in eval mode,
top-1 and top-5 (top-5 with more than 5 classes).

Heads: `cls` reads the mean of the K prefix (proxy) token outputs, `patch` the mean of the patch token
outputs, both after the encoder's final norm (and its `fc_norm`, if the timm model has one), then a
Linear layer (MAE's init: weights N(0, 2e-5), zero bias). Table 1 has both columns; fine-tuning the
backbone for two heads at once would not be either column's protocol, so each head listed in `heads`
is its own fine-tune from the same encoder (one after the other, in `OUT/<head>/`), and the metrics
name both: `top1_cls`, `top1_patch` (+ top-5, best epochs); `top1`/`top5` are the first listed head's.

Metrics: `top1`/`top5` = the LAST epoch (the headline); `best_epoch_top1`, `best_epoch` (and `_cls`/
`_patch` variants) = the best epoch on the evaluation split, labelled as such; `used` = every setting
actually used; `encoder` = the encoder's identity (weights path + sha256). Each `OUT/<head>/` holds the
engine's outputs (checkpoints/, dvclive/ with train/* and eval/* curves, model.safetensors = encoder +
head, run.json) and history.json (per-epoch results). Runs resume like pretraining.

Evaluating a third-party timm ViT: make an export folder by hand with `config.json` =
`{"architecture": "vit_base_patch16_224", "kwargs": {"img_size": 224, "global_pool": "token"}}` and the
timm state dict (no head: `num_classes=0`) saved as `model.safetensors`, e.g.
`save_file(timm.create_model(name, pretrained=True, num_classes=0).state_dict(), "DIR/model.safetensors")`,
then `semanticmim eval finetune-cls --encoder DIR --data ROOT --format imagenet --params FILE --out OUT`.
Any timm ViT with `group_matcher` gets the same layer decay; `cls` averages all its prefix tokens
(class token and registers alike).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import timm.data
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from timm.data.random_erasing import RandomErasing
from timm.models._manipulate import MATCH_PREV_GROUP
from timm.optim._param_groups import param_groups_layer_decay
from torch import nn
from torch.utils.data import DataLoader, Subset

from semanticmim.config import RunParams
from semanticmim.data.layouts import ClassificationDataset, SkipLog
from semanticmim.data.transforms import ClassifierEval, FinetuneTrain, build_mixup, normalize
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import Plan, RunOptions, Schedule, autocast_for, plan_batches
from semanticmim.engine.optim import build_schedule
from semanticmim.engine.tasks import to_device
from semanticmim.errors import InputError
from semanticmim.eval.encoder import Encoder, load_encoder
from semanticmim.eval.linear import pool, read_classification_splits, resolved_img_size, shard_bounds
from semanticmim.eval.metrics import (
    ClassificationAccuracy,
    EpochHistory,
    progress_bar,
    top_k_names,
    train_with_evaluation,
)
from semanticmim.schema import Strict

Pooling = Literal["cls", "patch"]
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"  # Table 3, fixed in `FinetuneTrain`
RANDOM_ERASING = 0.25  # Table 3, fixed in `FinetuneTask`


class Settings(Strict):
    """`eval.finetune_cls` in params.yaml: the paper's recipe by default [Table 3]."""

    heads: tuple[Pooling, ...] = ("cls", "patch")  # Table 1's FT CLS / FT Patch; each its own fine-tune
    epochs: PositiveInt = 100  # Table 3
    batch_size: PositiveInt = 1024  # Table 3: global batch (accumulation makes it up)
    batch_per_device: PositiveInt | None = None  # what fits; None: batch_size / world size
    lr: PositiveFloat = 4e-3  # Table 3, AdamW; stated for `lr_batch`, scaled linearly with the global batch
    lr_batch: PositiveInt = 1024  # the batch `lr` is stated for (Table 3)
    min_lr: float = Field(1e-6, ge=0.0)  # cosine floor of the BEiT/MAE fine-tuning code (paper: not stated)
    warmup_epochs: float = Field(0.0, ge=0.0)  # [paper Table 3] 0; authors' code: 20
    weight_decay: float = Field(1e-4, ge=0.0)  # [paper Table 3] 1e-4; authors' code: 0.05
    layer_decay: float = Field(0.65, gt=0.0, le=1.0)  # Table 3
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)  # Table 3
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)  # Table 3
    mixup: float = Field(0.8, ge=0.0)  # Table 3: Mixup alpha (0: off)
    cutmix: float = Field(1.0, ge=0.0)  # Table 3: CutMix alpha (0: off)
    betas: tuple[float, float] = (0.9, 0.999)  # BEiT fine-tuning code
    clip_grad: PositiveFloat | None = None  # not stated: none
    crop_scale: tuple[float, float] = (0.08, 1.0)  # Table 3 (timm's default crop), bicubic, flip 0.5
    img_size: PositiveInt | None = None  # None: the encoder's own input size (224 at paper scale)
    num_classes: PositiveInt | None = None  # None: the train split's classes; else it must match them
    train_split: str = "train"
    val_split: str = "val"  # CIFAR-10's folder is "test"
    eval_every: PositiveInt = 1  # epochs between evaluations; the last epoch is always evaluated
    num_workers: NonNegativeInt = 2  # data loading processes
    run: RunParams = RunParams()  # seed, checkpoints, logging, amp, compile

    @model_validator(mode="after")
    def _check(self) -> Settings:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must list cls and/or patch once each, got {self.heads}")
        return self

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


# --------------------------------------------------------------------------------- model, optimizer


class Classifier(nn.Module):
    """A timm ViT with a linear head on pooled final-norm tokens: images (B, 3, H, W) -> logits (B, C)."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's fine-tuning head init
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(images)  # (B, K + N, D), after the final norm
        prefix = self.encoder.num_prefix_tokens
        pooled = pool(tokens[:, :prefix], tokens[:, prefix:], self.pooling)
        return self.head(self.encoder.fc_norm(pooled))  # fc_norm: Identity unless the timm model has one


    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for layer decay: the encoder's timm groups under `encoder.`, except that the final norm
        leaves the last block's group for the top one it shares with the head (and `fc_norm`). These are
        the ids of BEiT's and the authors' mmpretrain code (stem 0, block b -> b, final norm and head d+1);
        timm's ViT matcher puts the final norm in the last block's group, which lifts every layer's lr by
        one decay step (its last block would get scale 1)."""
        matcher = self.encoder.group_matcher(coarse=coarse)
        blocks = matcher["blocks"] if isinstance(matcher["blocks"], list) else [(matcher["blocks"], None)]
        return {"stem": _under_encoder(matcher["stem"]),
                "blocks": [(_under_encoder(pattern), suffix) for pattern, suffix in blocks
                           if suffix != MATCH_PREV_GROUP]}

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}


def _under_encoder(pattern: str) -> str:
    """A timm group regex (matched at the name's start) for the same parameters under `encoder.`."""
    return rf"^encoder\.(?:{pattern.removeprefix('^')})"


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's `param_groups_layer_decay` on `Classifier.group_matcher`: param groups with `lr_scale` (the
    lr schedule applies it) = layer_decay^(d+1-id) — stem (tokens, position and patch embedding)
    layer_decay^(d+1), block b layer_decay^(d+1-b), final norm and head 1 — and weight decay except on
    biases, norms, tokens and the position embedding."""
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)


# ------------------------------------------------------------------------------------------- task


@dataclass
class FinetuneTask:
    """One fine-tuning step for the engine on uint8 `FinetuneTrain` views: normalise and randomly erase
    on the device (timm's prefetcher order), then Mixup/CutMix and soft-target cross-entropy, or
    label-smoothed cross-entropy when both are off."""

    model: Classifier
    mixup: timm.data.Mixup | None
    label_smoothing: float
    name: str = "finetune"
    erase_prob: float = RANDOM_ERASING

    def __post_init__(self) -> None:
        self.erasing = RandomErasing(self.erase_prob, mode="pixel", max_count=1, device=self.model.head.weight.device)

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        pixels, labels = to_device(batch, self.model.head.weight.device)
        # timm's erasing and Mixup draw from Python's and numpy's RNGs: seed them from the step's torch
        # RNG (seeded by the engine from seed, step and rank) so a resumed run matches an uninterrupted one
        random.seed(int(torch.randint(0, 2**31 - 1, ())))
        images = self.erasing(normalize(pixels))
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
                        options: RunOptions) -> dict[str, float]:
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


def fingerprint_of(settings: Settings, head: str, encoder: Encoder, data_root: Path, data_format: str) -> str:
    """What a checkpoint or history must share with a run to be reused by it."""
    values = settings.model_dump(mode="json", exclude={"heads", "num_workers", "eval_every"})
    values["run"] = {"seed": settings.run.seed, "amp": settings.run.amp}
    values.update(head=head, encoder=encoder.identity["sha256"], data=str(Path(data_root).resolve()),
                  format=data_format)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


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


def finetune_one(head: str, encoder_dir: Path, data_root: Path, data_format: str, settings: Settings, train_split,
                 val_split, out_dir: Path, env: DistEnv, quiet: bool) -> tuple[EpochHistory, dict, Plan, Encoder]:
    """Fine-tune the encoder with one head; returns its history, the engine's metrics and the batch plan."""
    encoder = load_encoder(encoder_dir, settings.img_size, drop_path_rate=settings.drop_path)
    img_size, num_classes = resolved_img_size(encoder), len(train_split.classes)
    if head == "cls" and encoder.num_prefix_tokens == 0:
        raise InputError("eval.finetune_cls.heads: 'cls' needs prefix (class/proxy) tokens and this encoder has "
                         "none; use heads: [patch]")
    per_device = settings.batch_per_device or max(1, settings.batch_size // env.world_size)
    if settings.mixes and per_device % 2:
        raise InputError(f"eval.finetune_cls: Mixup/CutMix pair each image with its mirror in the batch; "
                         f"the per-device batch {per_device} must be even")
    options = RunOptions(**settings.run.model_dump(), num_workers=settings.num_workers, quiet=quiet)
    train_set, val_loader = datasets(train_split, val_split, img_size, per_device, settings, out_dir, env)
    schedule = Schedule(epochs=settings.epochs, batch_size=per_device, effective_batch=settings.batch_size,
                        lr=settings.lr, min_lr=settings.min_lr, warmup_epochs=settings.warmup_epochs,
                        weight_decay=settings.weight_decay, betas=settings.betas, clip_grad=settings.clip_grad)
    plan = plan_batches(schedule, len(train_set), env.world_size)
    lr = settings.lr * plan.global_batch / settings.lr_batch
    schedule = Schedule(**{**vars(schedule), "lr": lr})
    torch.manual_seed(settings.run.seed)  # the same head on every rank and every rerun
    model = Classifier(encoder.model, num_classes, head).to(env.device)
    mixup = build_mixup(num_classes, settings.mixup, settings.cutmix, settings.label_smoothing) \
        if settings.mixes else None
    task = FinetuneTask(model, mixup, settings.label_smoothing, name=f"finetune-{head}")
    fingerprint = fingerprint_of(settings, head, encoder, data_root, data_format)
    history = EpochHistory.load(out_dir / "history.json", fingerprint)
    info = {"stage": f"eval finetune-cls ({head})", "settings": settings.model_dump(mode="json"),
            "encoder": encoder.identity, "world_size": env.world_size}

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        groups = layer_decay_groups(module, settings.weight_decay, settings.layer_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=settings.betas, fused=env.device.type in ("cpu", "cuda"))

    metrics = train_with_evaluation(
        task, train_set, schedule, options, env, out_dir, history,
        lambda: evaluate_classifier(model, val_loader, num_classes, env, options), fingerprint,
        make_optimizer=make_optimizer,
        make_lr_schedule=lambda optimizer, whole: build_schedule(optimizer, whole.total_steps, whole.warmup_steps,
                                                                 settings.min_lr),
        run_info=info, eval_every=settings.eval_every)
    return history, metrics, plan, encoder


def evaluate(encoder_dir: Path, data_root: Path, data_format: str, settings: Settings, out_dir: Path,
             env: DistEnv, quiet: bool) -> dict:
    """Fine-tune one model per head in `settings.heads` and evaluate each; see the module docstring."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    train_split, val_split = read_classification_splits(data_format, data_root, settings.train_split,
                                                        settings.val_split, settings.num_classes,
                                                        "eval.finetune_cls")
    num_classes = len(train_split.classes)
    names = top_k_names(num_classes)
    metrics: dict = {}
    runs: dict = {}
    for head in settings.heads:
        history, train_metrics, plan, encoder = finetune_one(head, encoder_dir, data_root, data_format, settings,
                                                             train_split, val_split, out_dir / head, env, quiet)
        if head == settings.heads[0]:
            metrics.update(history.summary("", names, "top1"))
        metrics.update(history.summary("", names, "top1", suffix=f"_{head}"))
        runs[head] = {"out": str(out_dir / head), "wall_time_s": train_metrics.get("wall_time_s", 0.0),
                      "final_loss": train_metrics.get("final_loss")}
    return {
        **metrics,
        "headline": {"head": settings.heads[0], "epoch": settings.epochs,
                     "note": "top1/top5: last epoch of the first head's fine-tune; best_epoch_*: the best epoch on "
                             "the evaluation split itself (optimistic, a diagnostic)"},
        "used": used_settings(settings, encoder, plan, num_classes, train_split, val_split),
        "encoder": encoder.identity,
        "runs": runs,
        "timing": {"total_s": time.perf_counter() - started},
        "skipped_images": len({entry["path"] for head in settings.heads
                               for entry in SkipLog(out_dir / head / "skipped.jsonl").entries()}),
    }


def used_settings(settings: Settings, encoder: Encoder, plan: Plan, num_classes: int, train_split,
                  val_split) -> dict:
    """Every choice that produced the numbers, resolved (lr after batch scaling, layer scales, ...)."""
    depth, img_size = encoder.depth, resolved_img_size(encoder)
    scale = plan.global_batch / settings.lr_batch
    return {
        "heads": list(settings.heads),
        "cls_pooling": f"mean of the {encoder.num_prefix_tokens} prefix (proxy) token outputs, after the final norm",
        "patch_pooling": "mean of the patch token outputs, after the final norm",
        "head": "Linear, init trunc-normal(0, 2e-5), zero bias",
        "optimizer": f"AdamW betas {tuple(settings.betas)}, weight decay {settings.weight_decay} "
                     "(none on biases, norms, tokens, position embedding)",
        "lr": settings.lr * scale,
        "base_lr": settings.lr,
        "lr_batch": settings.lr_batch,
        "global_batch": plan.global_batch,
        "layer_decay": settings.layer_decay,
        "layer_lr_scales": {"stem": settings.layer_decay ** (depth + 1),
                            **{f"block{b}": settings.layer_decay ** (depth + 1 - b) for b in range(1, depth + 1)},
                            "final_norm_and_head": 1.0},
        "schedule": f"per-step cosine to {settings.min_lr}, warmup {settings.warmup_epochs} epochs",
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
