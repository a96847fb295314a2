"""Classification linear probe: paper Table 5, Table 1's "IN-1K Linear CLS" and "Linear Patch" columns.

Protocol [paper Table 5]: the encoder is frozen (eval mode, no gradients); the features of one block
(block 7 [paper]; the authors' code takes the last block: `block: last`), before the final norm, are
pooled — `cls` = mean of the K prefix (proxy) token outputs, `patch` = mean of the patch token outputs —
put through a parameter-free LayerNorm and read by a Linear head. AdamW lr 4e-3 at batch 1024 (scaled
linearly with the global batch), wd 1e-4, per-step cosine, 100 epochs, random-resized crop (0.08, 1) +
flip. Evaluation: resize S·256/224, centre crop S, top-1/top-5 (top-5 with more than 5 classes).
Images are normalised with the encoder's own mean/std (config.json; ImageNet's by default).

All heads train together on one pass of the backbone, as DINOv2's linear evaluation does: every
(block, pooling, lr) of the grid `({block} ∪ grid_blocks) × poolings × ({lr} ∪ grid_lrs)` is a Linear
head fed from the same forward pass, and the loss is the sum of the heads' losses (heads share no
parameters, so each trains exactly as it would alone; the `train/loss` curve is that sum). Table 1's
two linear columns cost one backbone pass.

Modes — both trained by the engine's one loop (resumable, DDP, dvclive, rich progress), with the same
batch plan, AdamW, per-step cosine and an evaluation every `eval_every` epochs:
- `paper`: augmented training images, the backbone runs at every step (the paper's protocol).
- `cached`: the backbone runs once over unaugmented train images (resize + centre crop) and the heads
  train on the cached features in memory — many times faster, not the paper's protocol (no
  augmentation). The loop's dataset is then the row indices of the cached features (every rank holds
  them all) and the task's loss runs the heads on those rows; the rows come in the loop's seeded
  order (its sampler: a permutation per epoch from seed + epoch), not the per-epoch `randperm` of the
  former hand-written loop, so cached numbers differ (within noise) from those of earlier versions.
In both modes the validation features are extracted once (they are deterministic) and cached on disk
(`OUT/features/`) with the train features of `cached` mode, so a resumed run does not recompute them.

Result `{"metrics", "run"}`. The metrics are nested under the mode — `paper.top1` or `cached.top1` in
`dvc metrics show` — so that `dvc metrics diff` never compares a cached number with a paper-protocol
one (a key that one side lacks shows as added/removed). Under the mode: `top1`/`top5` = the LAST epoch
of the paper-protocol head (`block`, `lr`, `cls` pooling, or the first of `poolings` without `cls`);
`top1_cls`/`top1_patch` (+ top-5) = Table 1's two columns; `best_epoch_top1`, `best_epoch` (and
`_cls`/`_patch` variants) = the best epoch on the evaluation split, labelled as such. run: `grid` =
every head's numbers (a labelled diagnostic), `used` = every setting actually used, `encoder` = the
encoder's identity (weights path + sha256), timing.

Outputs in OUT: metrics.json and run.json (by the stage), history.json (per-epoch results),
model.safetensors (the heads), checkpoints/, dvclive/ (train/* and eval/* curves), features/,
skipped.jsonl.

Evaluating a third-party timm ViT: make an export folder by hand with `config.json` =
`{"architecture": "vit_base_patch16_224", "kwargs": {"img_size": 224, "global_pool": "token"}}` and the
timm state dict (no head: `num_classes=0`) saved as `model.safetensors`, e.g.
`save_file(timm.create_model(name, pretrained=True, num_classes=0).state_dict(), "DIR/model.safetensors")`,
then `semanticmim eval linear-cls --encoder DIR --data ROOT --format imagefolder --params FILE --out OUT`.
Its prefix tokens (class token, registers) make the `cls` feature; a model without any cannot use `cls`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from semanticmim.data.layouts import ClassificationDataset, ClassificationSplit, SkipLog
from semanticmim.data.loader import RowIndices
from semanticmim.data.transforms import ClassifierEval, CropFlip
from semanticmim.engine.distributed import DistEnv, all_ranks, gather_shards, shard_bounds
from semanticmim.engine.history import History
from semanticmim.engine.loop import Evaluation, Plan, RunOptions, autocast_for, to_device, train
from semanticmim.engine.recipe import CropScale, Recipe, check_crop_scale
from semanticmim.eval.encoder import Encoder, load_encoder
from semanticmim.eval.metrics import (
    ClassificationAccuracy,
    fingerprint,
    progress_bar,
    protocol_result,
    top_k_names,
)
from semanticmim.eval.splits import read_splits
from semanticmim.settings import Strict

Pooling = Literal["cls", "patch"]
BlockChoice = PositiveInt | Literal["last"]
KEY = "eval.linear_cls"
LAYER_NORM_EPS = 1e-6  # the encoders' own LayerNorm eps
PAPER_BLOCK, PAPER_DEPTH = 7, 12  # [paper §4.3] block 7 of ViT-B's 12


class Settings(Strict):
    """`eval.linear_cls` in params.yaml: the paper's recipe by default [Table 5]."""

    mode: Literal["paper", "cached"] = "paper"  # paper: augmented, backbone every step; cached: features once
    # [paper §4.3, Table 5] block 7 (1-based) of ViT-B's 12; None: that relative depth of any encoder
    # (round(7·depth/12): 7 of 12, 2 of 4); an int is taken as is; authors' code: "last"
    block: BlockChoice | None = None
    poolings: tuple[Pooling, ...] = ("cls", "patch")  # Table 1's "Linear CLS" and "Linear Patch" columns
    feature_norm: Literal["layernorm", "none"] = "layernorm"  # [paper] parameter-free LayerNorm before the head
    epochs: PositiveInt = 100  # Table 5
    batch_size: PositiveInt = 1024  # Table 5: global batch (accumulation makes it up)
    batch_per_device: PositiveInt | None = None  # what fits; None: batch_size / world size
    lr: PositiveFloat = 4e-3  # Table 5, AdamW; stated for `lr_batch`, scaled linearly with the global batch
    lr_batch: PositiveInt = 1024  # the batch `lr` is stated for (Table 5)
    min_lr: float = Field(0.0, ge=0.0)  # cosine decays to this (not stated: 0)
    warmup_epochs: float = Field(0.0, ge=0.0)  # Table 5 states no warmup
    weight_decay: float = Field(1e-4, ge=0.0)  # Table 5 (on the head weights, not biases)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW defaults (not stated)
    crop_scale: CropScale = (0.08, 1.0)  # Table 5: random-resized crop + flip 0.5 (paper mode)
    img_size: PositiveInt | None = None  # None: the encoder's own input size (224 at paper scale)
    grid_blocks: tuple[BlockChoice, ...] = ()  # diagnostic: more blocks trained on the same pass
    grid_lrs: tuple[PositiveFloat, ...] = ()  # diagnostic: more lrs (stated for `lr_batch` like `lr`)
    num_classes: PositiveInt | None = None  # None: the train split's classes; else it must match them
    train_split: str = "train"
    val_split: str = "val"  # CIFAR-10's folder is "test"
    eval_every: PositiveInt = 1  # epochs between evaluations; the last epoch is always evaluated
    num_workers: NonNegativeInt = 2  # data loading processes
    run: RunOptions = RunOptions()  # seed, checkpoints, logging, amp

    @model_validator(mode="after")
    def _check(self) -> Settings:
        check_crop_scale(self.crop_scale)
        if not self.poolings or len(set(self.poolings)) != len(self.poolings):
            raise ValueError(f"poolings must list cls and/or patch once each, got {self.poolings}")
        return self

    def per_device(self, world_size: int) -> int:
        return self.batch_per_device or max(1, self.batch_size // world_size)

    def recipe(self, world_size: int, lr: float | None = None) -> Recipe:
        """The engine's recipe type for this probe (`lr`: a grid head's, stated for `lr_batch` too)."""
        return Recipe(epochs=self.epochs, batch_size=self.batch_size, batch_per_device=self.per_device(world_size),
                      lr=lr or self.lr, lr_batch=self.lr_batch, min_lr=self.min_lr, warmup_epochs=self.warmup_epochs,
                      weight_decay=self.weight_decay, betas=self.betas, clip_grad=None, crop_scale=self.crop_scale)


# ------------------------------------------------------------------------------------------- data


def resolved_img_size(encoder: Encoder) -> int:
    return int(encoder.model.patch_embed.img_size[0])


# ------------------------------------------------------------------------------ features and heads


def pool(prefix: torch.Tensor, patches: torch.Tensor, pooling: str) -> torch.Tensor:
    """prefix (B, K, D), patches (B, N, D) -> (B, D): `cls` = mean of the K prefix (proxy) tokens,
    `patch` = mean of the N patch tokens."""
    return (prefix if pooling == "cls" else patches).mean(1)


@dataclass(frozen=True)
class HeadSpec:
    """One linear head of the grid: which block and pooling it reads, and its lr (at `lr_batch`)."""

    block: int
    pooling: str
    lr: float

    @property
    def slot(self) -> tuple[int, str]:
        return self.block, self.pooling

    @property
    def name(self) -> str:
        return f"block{self.block}/{self.pooling}/lr{self.lr:g}"


class ProbeFeatures:
    """The frozen encoder as the heads' input: uint8 images (B, 3, H, W), normalised here on their
    device with the encoder's mean/std -> (B, S, D), one slot per (block, pooling) in `slots`, pooled
    and (by default) through a parameter-free LayerNorm. One backbone pass serves every slot."""

    def __init__(self, encoder: Encoder, slots: list[tuple[int, str]], layer_norm: bool):
        self.encoder, self.slots, self.layer_norm = encoder, slots, layer_norm
        self.blocks = sorted({block for block, _ in slots})

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.slots), self.encoder.embed_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.block_tokens(self.encoder.normalize(images), self.blocks)
        outputs = dict(zip(self.blocks, tokens, strict=True))
        features = torch.stack([pool(*outputs[block], pooling) for block, pooling in self.slots], 1).float()
        if self.layer_norm:
            features = F.layer_norm(features, features.shape[-1:], eps=LAYER_NORM_EPS)
        return features


class LinearHeads(nn.Module):
    """Every head of the grid (DINOv2's `AllClassifiers`): features (B, S, D) -> logits (B, H, C);
    head h reads slot `slot_index[h]`. Init as DINOv2: weights N(0, 0.01), zero biases."""

    def __init__(self, specs: list[HeadSpec], slots: list[tuple[int, str]], dim: int, num_classes: int):
        super().__init__()
        self.slot_index = [slots.index(spec.slot) for spec in specs]
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in specs)
        for head in self.heads:
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(features[:, slot]) for head, slot in zip(self.heads, self.slot_index, strict=True)],
                           1)


def heads_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, H, C), labels (B,) -> the sum over heads of each head's mean cross-entropy."""
    heads = logits.shape[1]
    return F.cross_entropy(logits.float().transpose(1, 2), labels[:, None].expand(-1, heads)) * heads


def heads_optimizer(heads: LinearHeads, lrs: list[float], settings: Settings,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW with each head's own lr (`lrs`, already scaled to the global batch); wd on weights only."""
    groups = []
    for head, lr in zip(heads.heads, lrs, strict=True):
        groups += [{"params": [head.weight], "lr": lr, "weight_decay": settings.weight_decay},
                   {"params": [head.bias], "lr": lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, betas=settings.betas, fused=device.type in ("cpu", "cuda"))


def plan_heads(settings: Settings, encoder: Encoder) -> tuple[list[HeadSpec], list[tuple[int, str]], int]:
    """The grid's heads, their feature slots, and the resolved headline block (block checks included)."""
    def resolve(block: int | str | None, key: str) -> int:
        if block is None:
            return max(1, math.floor(PAPER_BLOCK * encoder.depth / PAPER_DEPTH + 0.5))
        return encoder.depth if block == "last" else encoder.check_block(int(block), key)

    block = resolve(settings.block, f"{KEY}.block")
    blocks = [block] + [b for b in (resolve(g, f"{KEY}.grid_blocks") for g in settings.grid_blocks)
                        if b != block]
    lrs = [settings.lr] + [lr for lr in settings.grid_lrs if lr != settings.lr]
    if "cls" in settings.poolings:
        encoder.require_prefix(f"{KEY}.poolings", "poolings: [patch]")
    specs = [HeadSpec(b, p, lr) for b in dict.fromkeys(blocks) for p in settings.poolings for lr in lrs]
    slots = list(dict.fromkeys(spec.slot for spec in specs))
    return specs, slots, block


# ------------------------------------------------------------------------------- feature extraction


def extract_features(features: ProbeFeatures, dataset: Dataset, batch_size: int, env: DistEnv,
                     options: RunOptions, description: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen backbone once over `dataset` (sharded over ranks, gathered on all of them):
    -> features (N, S, D) float32 and labels (N,) int64, on the CPU, in dataset order."""
    bounds = shard_bounds(len(dataset), env)  # type: ignore[arg-type]
    shard = Subset(dataset, range(bounds[env.rank], bounds[env.rank + 1]))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=options.num_workers,
                        pin_memory=env.device.type == "cuda")
    outputs, labels = [torch.empty(0, *features.shape)], [torch.empty(0, dtype=torch.long)]
    with progress_bar(description, env.is_main and not options.quiet) as bar:
        task = bar.add_task(description, total=len(loader))
        for images, targets in loader:
            with autocast_for(env.device, options.amp):
                outputs.append(features(images.to(env.device, non_blocking=True)).float().cpu())
            labels.append(targets.long())
            bar.advance(task)
    return gather_shards(torch.cat(outputs), bounds, env), gather_shards(torch.cat(labels), bounds, env)


def cached_features(path: Path, key: str, compute, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute()`'s (features, labels), saved to `path` (rank 0, atomically) and reloaded from it by a
    later run whose `key` (encoder, data, slots, input size) is the same."""
    def matches() -> bool:
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("key") == key

    if all_ranks(matches(), env):
        tensors = load_file(str(path))
        return tensors["features"], tensors["labels"]
    features, labels = compute()
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"features": features.contiguous(), "labels": labels}, str(tmp), metadata={"key": key})
        tmp.replace(path)
    return features, labels


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, specs: list[HeadSpec], features: torch.Tensor, labels: torch.Tensor,
                   num_classes: int, device: torch.device, batch_size: int) -> dict[str, float]:
    """Accuracy of every head on cached (unaugmented) features: `{"<head name>/top1": %, ...}`."""
    was_training = heads.training
    heads.eval()
    meters = [ClassificationAccuracy(num_classes, device) for _ in specs]  # same samples on every rank
    for start in range(0, len(features), batch_size):
        logits = heads(features[start:start + batch_size].to(device))
        targets = labels[start:start + batch_size].to(device)
        for index, meter in enumerate(meters):
            meter.update(logits[:, index], targets)
    heads.train(was_training)
    return {f"{spec.name}/{name}": value for spec, meter in zip(specs, meters, strict=True)
            for name, value in meter.compute().items()}


# ------------------------------------------------------------------------------------ paper mode


@dataclass
class ProbeTask:
    """Paper mode for the engine: each step runs the frozen backbone once on augmented images and
    trains every head on its output (the backbone is not part of `model`: not trained, not saved)."""

    model: LinearHeads
    features: ProbeFeatures
    name: str = "linear-probe"

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        images, labels = to_device(batch, next(self.model.parameters()).device)
        return heads_loss(module(self.features(images)), labels)

    def to(self, device: torch.device) -> ProbeTask:
        self.features.encoder.model.to(device)
        return self


@dataclass
class CachedProbeTask:
    """Cached mode for the engine: the loop's dataset is the row indices (N,) of the cached `features`
    (N, S, D) and `labels` (N,), held in memory on every rank; each step runs every head on its rows."""

    model: LinearHeads
    features: torch.Tensor
    labels: torch.Tensor
    name: str = "linear-probe-cached"

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        rows = batch
        device = next(self.model.parameters()).device
        return heads_loss(module(self.features[rows].to(device, non_blocking=True)), self.labels[rows].to(device))

    def to(self, device: torch.device) -> CachedProbeTask:
        return self


# ------------------------------------------------------------------------------------- the protocol


def evaluate(encoder_dir: Path, data_root: Path, layout: str, settings: Settings, out_dir: Path,
             env: DistEnv, quiet: bool) -> dict:
    """Train the probe grid on `data_root`'s train split and evaluate it on its val split:
    `{"metrics", "run"}`, see the module docstring."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    encoder = load_encoder(encoder_dir, settings.img_size, size_key=f"{KEY}.img_size")
    encoder.model.requires_grad_(False).eval().to(env.device)
    train_split, val_split = read_splits("classification", layout, data_root, settings.train_split,
                                         settings.val_split, settings.num_classes, KEY)
    num_classes, img_size = len(train_split.classes), resolved_img_size(encoder)
    specs, slots, block = plan_heads(settings, encoder)
    depth = encoder.depth
    # blocks after the deepest one read are never needed: drop them (and the final norm, the head)
    encoder.model.prune_intermediate_layers([max(spec.block for spec in specs) - 1], prune_norm=True)
    features = ProbeFeatures(encoder, slots, settings.feature_norm == "layernorm")
    options = replace(settings.run, num_workers=settings.num_workers, quiet=quiet)
    identity = {"encoder": encoder.identity["sha256"], "normalization": [encoder.mean, encoder.std],
                "data": str(Path(data_root).resolve()), "format": layout}
    per_device = settings.per_device(env.world_size)
    skipped = out_dir / "skipped.jsonl"

    def extract(split: ClassificationSplit, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = ClassificationDataset(split, ClassifierEval(img_size), skip_report=skipped, lazy_decode=True)
        # what the features depend on (not the training recipe: a new lr grid reuses them)
        key = json.dumps([identity, split.name, len(split.samples), slots, img_size, settings.feature_norm,
                          settings.run.amp])
        return cached_features(out_dir / "features" / f"{name}.safetensors", key,
                               lambda: extract_features(features, dataset, per_device, env, options,
                                                        f"features {name}"), env)

    tick = time.perf_counter()
    val_features, val_labels = extract(val_split, "val")
    torch.manual_seed(settings.run.seed)  # the same initial heads on every rank and every rerun
    heads = LinearHeads(specs, slots, encoder.embed_dim, num_classes).to(env.device)
    if settings.mode == "cached":
        train_features, train_labels = extract(train_split, "train")
        task: ProbeTask | CachedProbeTask = CachedProbeTask(heads, train_features, train_labels)
        train_set: Dataset = RowIndices(len(train_features))
    else:
        task = ProbeTask(heads, features)
        train_set = ClassificationDataset(train_split, CropFlip(img_size, settings.crop_scale), skip_report=skipped,
                                          lazy_decode=True)
    extract_s = time.perf_counter() - tick
    schedule, plan = settings.recipe(env.world_size).plan(len(train_set), env.world_size)
    lrs = [settings.recipe(env.world_size, spec.lr).scaled_lr(plan.global_batch) for spec in specs]

    def evaluate_epoch(_epoch: int) -> dict[str, float]:
        return evaluate_heads(heads, specs, val_features, val_labels, num_classes, env.device, per_device)

    info = {"stage": "eval linear-cls", "settings": settings.model_dump(mode="json"), "encoder": encoder.identity,
            "world_size": env.world_size}
    trained = train(task, train_set, schedule, options, env, out_dir, run_info=info,
                    fingerprint=fingerprint(settings, **identity),
                    make_optimizer=lambda model: heads_optimizer(model, lrs, settings, env.device),
                    evaluate=Evaluation(evaluate_epoch, settings.eval_every, "epoch"))
    backbone_images = (len(train_split.samples) if settings.mode == "cached" else plan.total_steps * plan.global_batch)
    metrics, details = summarise(trained["history"], settings, specs, block, num_classes)
    run = {
        **details,
        "used": used_settings(settings, encoder, depth, specs, lrs, block, img_size, plan, num_classes, train_split,
                              val_split),
        "encoder": encoder.identity,
        "timing": {"extract_s": extract_s, "train_s": trained.get("wall_time_s", 0.0),
                   "total_s": time.perf_counter() - started,
                   "backbone_images": backbone_images + len(val_split.samples)},
        "train": {key: trained.get(key) for key in ("final_loss", "steps", "wall_time_s", "img_per_s")},
        "batch_plan": vars(plan),
        "skipped_images": len(SkipLog(skipped).entries()),
    }
    names = top_k_names(num_classes)
    return protocol_result(metrics, run, headline=[f"{settings.mode}.{name}" for name in names])


def summarise(history: History, settings: Settings, specs: list[HeadSpec], block: int,
              num_classes: int) -> tuple[dict, dict]:
    """(metrics, details): the headline (last epoch of the paper-protocol head), Table 1's cls/patch
    columns by name and the best epochs labelled as such, all under the mode; the whole grid as a
    diagnostic."""
    names = top_k_names(num_classes)
    headline = HeadSpec(block, "cls" if "cls" in settings.poolings else settings.poolings[0], settings.lr)
    numbers = history.summary(f"{headline.name}/", names, "top1")
    for pooling in settings.poolings:
        spec = HeadSpec(block, pooling, settings.lr)
        numbers.update(history.summary(f"{spec.name}/", names, "top1", suffix=f"_{pooling}"))
    details = {
        "headline_head": {"head": headline.name, "epoch": int(history.last()["epoch"]), "mode": settings.mode},
        "notes": {"headline": f"{settings.mode}.top1/top5: last epoch of the paper-protocol head; best_epoch_*: "
                              "the best epoch on the evaluation split itself (optimistic, a diagnostic); "
                              f"mode {settings.mode}: "
                              + ("the paper's protocol" if settings.mode == "paper" else
                                 "features cached once without augmentation, not the paper's protocol")},
        "grid": {spec.name: history.summary(f"{spec.name}/", names, "top1") for spec in specs},
    }
    return {settings.mode: numbers}, details


def used_settings(settings: Settings, encoder: Encoder, depth: int, specs: list[HeadSpec], lrs: list[float],
                  block: int, img_size: int, plan: Plan, num_classes: int, train_split: ClassificationSplit,
                  val_split: ClassificationSplit) -> dict:
    """Every choice that produced the numbers, resolved (block index, lr after batch scaling, ...)."""
    augmentation = (f"random-resized crop {tuple(settings.crop_scale)} bicubic + flip 0.5"
                    if settings.mode == "paper" else "none: resize + centre crop, features cached once")
    return {
        "mode": settings.mode,
        "block": block,
        "block_setting": settings.block or f"paper: block {PAPER_BLOCK} of {PAPER_DEPTH}, scaled to the depth",
        "encoder_depth": depth,
        "poolings": list(settings.poolings),
        "cls_pooling": f"mean of the {encoder.num_prefix_tokens} prefix (proxy) token outputs",
        "patch_pooling": "mean of the patch token outputs",
        "features": "block output before the final norm",
        "feature_norm": "parameter-free LayerNorm (eps 1e-6)" if settings.feature_norm == "layernorm" else "none",
        "normalization": {"mean": list(encoder.mean), "std": list(encoder.std)},
        "head": "Linear, init N(0, 0.01)",
        "optimizer": f"AdamW betas {tuple(settings.betas)}, weight decay {settings.weight_decay} (weights only)",
        "lr": lrs[0],
        "base_lr": settings.lr,
        "lr_batch": settings.lr_batch,
        "global_batch": plan.global_batch,
        "schedule": f"per-step cosine to {settings.min_lr}, warmup {settings.warmup_epochs} epochs",
        "epochs": settings.epochs,
        "steps": plan.total_steps,
        "img_size": img_size,
        "train_augmentation": augmentation,
        "eval_transform": f"resize {img_size * 256 // 224} bicubic + centre crop {img_size}",
        "grid": {"heads": len(specs), "blocks": sorted({spec.block for spec in specs}),
                 "lrs": sorted({spec.lr for spec in specs}), "lrs_scaled": sorted(set(lrs)),
                 "note": "all heads train on one backbone pass; only the headline head is the paper protocol"},
        "num_classes": num_classes,
        "train": {"split": train_split.name, "images": len(train_split.samples)},
        "val": {"split": val_split.name, "images": len(val_split.samples)},
        "seed": settings.run.seed,
    }
