"""ADE20K UperNet fine-tuning [paper Table 4 + BEiT's mmseg config]: the whole encoder and an UperNet
decoder (`decoder.py`) trained end to end, scored with sliding-window inference.

Recipe: blocks 4/6/8/12 -> feature pyramid -> UperHead (PPM 1/2/3/6, 768 channels) + auxiliary FCN
head on block 8 (weight 0.4); AdamW lr 3e-5, betas (0.9, 0.999), wd 0.05 (none on norms, biases,
tokens, position embeddings), layer-wise lr decay 0.9, linear warmup over 1500 steps then linear
decay to 0, 160k steps at batch 16, stochastic depth 0.1; 640x640 crops of images randomly resized
into (2560, 640) x 0.5-2 (cat_max_ratio 0.75), flip, photometric distortion; evaluation on the image
resized into (2560, 640), 640x640 windows every 426 px, logits resized to the label; single scale.

Iterations, not epochs: the loop samples a "chunk" of `eval_interval` steps x the global batch per
epoch, chunk k covering the training images in order from (k x its length) mod N, shuffled within the
chunk, so every image is seen equally often (±1) whatever the interval and the dataset size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn
from torch.utils.data import Dataset

from semanticmim.config import RunParams
from semanticmim.data.layouts import SegmentationDataset
from semanticmim.data.transforms import AdeTrain, SegmentationEval
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import Plan, RunOptions, Schedule, plan_batches
from semanticmim.engine.tasks import to_device
from semanticmim.errors import InputError
from semanticmim.eval.encoder import load_encoder
from semanticmim.eval.segmentation.decoder import FCNHead, UperHead, UperNetSegmenter, ViTPyramid
from semanticmim.eval.segmentation.inference import evaluate_dataset, slide_inference
from semanticmim.eval.segmentation.protocol import (
    Interval,
    TrainingRun,
    protocol_metrics,
    read_splits,
    scaled_blocks,
    segmentation_loss,
    settings_fingerprint,
    train_in_intervals,
)
from semanticmim.schema import Strict

__all__ = [
    "Settings",
    "StepChunk",
    "UperNetTask",
    "WarmupPolySchedule",
    "build_segmenter",
    "evaluate",
    "layer_decay_groups",
]

PAPER_BLOCKS = (4, 6, 8, 12)  # [code: out_indices 3, 5, 7, 11]


class Settings(Strict):
    """`eval.finetune_seg` in params.yaml. None = derived from the encoder or the dataset (see comments)."""

    blocks: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] | None = None  # None: 4/6/8/12 of 12 scaled
    decoder_channels: PositiveInt = 768  # UperHead width [code]
    pool_scales: tuple[PositiveInt, ...] = (1, 2, 3, 6)  # PPM bins [code]
    aux_channels: PositiveInt = 256  # FCN auxiliary head [code]
    aux_weight: float = Field(0.4, ge=0.0)  # [code]
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # before both classifiers [mmseg]
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)  # stochastic depth [Table 4]
    crop_size: PositiveInt = 640  # [Table 4]
    ratio_range: tuple[float, float] = (0.5, 2.0)  # random resize of (4 x crop, crop) [mmseg ADE20K pipeline]
    cat_max_ratio: float = Field(0.75, gt=0.0, le=1.0)  # [mmseg ADE20K pipeline]
    steps: PositiveInt = 160_000  # [Table 4]
    batch_size: PositiveInt = 16  # global [Table 4]
    per_device_batch: PositiveInt | None = None  # None: batch_size / world size; smaller -> accumulation
    lr: PositiveFloat = 3e-5  # [Table 4]
    min_lr: float = Field(0.0, ge=0.0)  # [Table 4]
    weight_decay: float = Field(0.05, ge=0.0)  # [Table 4]
    layer_decay: float = Field(0.9, gt=0.0, le=1.0)  # [code]
    betas: tuple[float, float] = (0.9, 0.999)  # [Table 4]
    eps: PositiveFloat = 1e-8  # [Table 4]
    warmup_steps: int = Field(1500, ge=0)  # linear from ~0, then linear ("poly 1.0") decay [Table 4]
    slide_stride: PositiveInt | None = None  # None: 2/3 of the crop, 426 at 640 [code: test_cfg]
    eval_interval: PositiveInt = 16_000  # steps between evaluations [mmseg 160k schedule]; must divide steps
    eval_batch_size: PositiveInt = 8  # sliding windows per forward pass
    num_classes: PositiveInt | None = None  # None: the dataset's (150 for ADE20K); else must match it
    train_split: str | None = None  # None: training / train
    val_split: str | None = None  # None: validation / val
    num_workers: int = Field(2, ge=0)
    run: RunParams = RunParams()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.steps % self.eval_interval:
            raise ValueError(f"eval_interval={self.eval_interval} must divide steps={self.steps}")
        if not 0.0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        return self


# ---------------------------------------------------------------------------------------- model


def build_segmenter(
    vit: nn.Module, blocks: tuple[int, int, int, int], num_classes: int, settings: Settings
) -> UperNetSegmenter:
    dim = vit.embed_dim
    return UperNetSegmenter(
        ViTPyramid(vit, blocks),
        UperHead(dim, settings.decoder_channels, num_classes, settings.pool_scales, settings.dropout),
        FCNHead(dim, settings.aux_channels, num_classes, num_convs=1, dropout=settings.dropout),
    )


@dataclass
class UperNetTask:
    """Decode loss + aux_weight x auxiliary loss, both cross-entropy at the label's resolution."""

    model: UperNetSegmenter
    aux_weight: float
    name: str = "finetune-seg"

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        images, labels = to_device(batch, next(self.model.parameters()).device)
        logits, aux_logits = module(images)
        return segmentation_loss(logits, labels) + self.aux_weight * segmentation_loss(aux_logits, labels)

    def to(self, device: torch.device) -> UperNetTask:
        return self


class StepChunk(Dataset):
    """`length` samples of `dataset` starting at `start` (mod its size): one evaluation interval's data."""

    def __init__(self, dataset: Dataset, start: int, length: int):
        self.dataset, self.start, self.length = dataset, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[(self.start + index) % len(self.dataset)]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ optimizer


def layer_id(name: str, depth: int) -> int:
    """BEiT's layer-wise decay ids: tokens, position embedding and patch embedding 0, block i i+1,
    everything else (pyramid, heads) depth + 1."""
    if name.startswith("backbone.vit."):
        inner = name[len("backbone.vit.") :]
        if inner.startswith("blocks."):
            return int(inner.split(".")[1]) + 1
        if inner.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre")):
            return 0
    return depth + 1


def layer_decay_groups(model: UperNetSegmenter, weight_decay: float, layer_decay: float, depth: int) -> list[dict]:
    """AdamW parameter groups: lr scale layer_decay^(depth + 1 - layer id); no weight decay on 1-D
    parameters (norms, biases, layer scales), tokens and position embeddings [BEiT code]."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith((".bias", "_token", "pos_embed"))
        layer = layer_id(name, depth)
        group = groups.setdefault(
            (layer, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - layer),
                "layer_id": layer,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


class WarmupPolySchedule:
    """mmseg's poly(power 1) with linear warmup, per step: regular = (base - min)(1 - step/total) + min;
    during warmup x (1 - (1 - step/warmup)(1 - 1e-6)); each group's lr x its `lr_scale`."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
    ):
        self.optimizer, self.base_lr, self.total, self.warmup, self.min_lr = (
            optimizer,
            base_lr,
            total_steps,
            warmup_steps,
            min_lr,
        )

    def lr_at(self, step: int) -> float:
        lr = (self.base_lr - self.min_lr) * max(0.0, 1 - step / self.total) + self.min_lr
        if step < self.warmup:
            lr *= 1 - (1 - step / self.warmup) * (1 - 1e-6)
        return lr

    def step_update(self, step: int) -> None:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


# -------------------------------------------------------------------------------------- protocol


def evaluate(
    encoder_dir: Path, data_root: Path, data_format: str, settings: Settings, out_dir: Path, env: DistEnv, quiet: bool
) -> dict:
    """Fine-tune encoder + UperNet and score it; returns metrics (mIoU after the last step as the headline)."""
    encoder = load_encoder(encoder_dir, img_size=settings.crop_size, drop_path_rate=settings.drop_path)
    depth, patch = encoder.depth, encoder.model.patch_embed.patch_size[0]
    blocks = settings.blocks or scaled_blocks(PAPER_BLOCKS, depth)
    for block in blocks:
        encoder.check_block(block, "eval.finetune_seg.blocks")
    stride = settings.slide_stride or settings.crop_size * 2 // 3
    if settings.crop_size % patch:
        raise InputError(
            f"eval.finetune_seg.crop_size={settings.crop_size}: expected a multiple of the patch size {patch}"
        )
    train_split, val_split = read_splits(
        data_format, data_root, settings.train_split, settings.val_split, settings.num_classes
    )
    classes = train_split.classes
    skips = out_dir / "skipped.jsonl"
    train_data = SegmentationDataset(
        train_split, AdeTrain(settings.crop_size, settings.ratio_range, settings.cat_max_ratio), skip_report=skips
    )
    val_data = SegmentationDataset(val_split, SegmentationEval(settings.crop_size), skip_report=skips)

    per_device = settings.per_device_batch or math.ceil(settings.batch_size / env.world_size)
    schedule = Schedule(
        epochs=settings.steps // settings.eval_interval,
        batch_size=per_device,
        effective_batch=settings.batch_size,
        lr=settings.lr,
        min_lr=settings.min_lr,
        warmup_epochs=0.0,
        weight_decay=settings.weight_decay,
        betas=settings.betas,
        eps=settings.eps,
    )
    accumulation = max(1, round(settings.batch_size / (per_device * env.world_size)))  # as the loop's plan
    chunk = settings.eval_interval * per_device * env.world_size * accumulation  # one interval's samples
    plan = plan_batches(schedule, chunk, env.world_size)
    used = {
        "blocks": list(blocks),
        "encoder_depth": depth,
        "crop_size": settings.crop_size,
        "pos_embed_grid": settings.crop_size // patch,
        "eval_scale": [4 * settings.crop_size, settings.crop_size],
        "slide_window": settings.crop_size,
        "slide_stride": stride,
        "decoder_channels": settings.decoder_channels,
        "pool_scales": list(settings.pool_scales),
        "aux_channels": settings.aux_channels,
        "aux_weight": settings.aux_weight,
        "optimizer": "AdamW",
        "lr": settings.lr,
        "weight_decay": settings.weight_decay,
        "layer_decay": settings.layer_decay,
        "betas": list(settings.betas),
        "lr_schedule": "linear warmup + poly(1.0)",
        "warmup_steps": settings.warmup_steps,
        "steps": plan.total_steps,
        "eval_interval": settings.eval_interval,
        "global_batch": plan.global_batch,
        "per_device_batch": per_device,
        "accumulation": plan.accumulation,
        "world_size": env.world_size,
        "drop_path": settings.drop_path,
        "num_classes": len(classes),
        "seed": settings.run.seed,
    }

    torch.manual_seed(settings.run.seed)  # the same decoder init on every rank and every rerun
    model = build_segmenter(encoder.model, blocks, len(classes), settings)
    if env.distributed and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN: BN over the global batch
    task = UperNetTask(model, settings.aux_weight)

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        groups = layer_decay_groups(module, settings.weight_decay, settings.layer_decay, depth)
        return torch.optim.AdamW(
            groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, fused=env.device.type in ("cpu", "cuda")
        )

    def make_lr_schedule(optimizer: torch.optim.Optimizer, _plan: Plan) -> WarmupPolySchedule:
        return WarmupPolySchedule(optimizer, settings.lr, settings.steps, settings.warmup_steps, settings.min_lr)

    fingerprint = settings_fingerprint(
        settings,
        protocol="finetune-seg",
        encoder=encoder.identity["sha256"],
        data=str(data_root),
        format=data_format,
        classes=classes,
        blocks=blocks,
        splits=[train_split.name, val_split.name],
    )
    options = RunOptions(**settings.run.model_dump(), num_workers=settings.num_workers, quiet=quiet)
    run = TrainingRun(
        task,
        schedule,
        options,
        env,
        out_dir,
        {"protocol": "finetune-seg", "used": used},
        fingerprint,
        make_optimizer,
        make_lr_schedule,
    )
    intervals = [
        Interval(k + 1, {"step": (k + 1) * settings.eval_interval}, StepChunk(train_data, k * chunk, chunk))
        for k in range(settings.steps // settings.eval_interval)
    ]

    def infer(images: torch.Tensor) -> torch.Tensor:
        return slide_inference(model.predict, images, settings.crop_size, stride, settings.eval_batch_size)

    def evaluate_now() -> dict:
        return evaluate_dataset(infer, val_data, classes, env, 1, settings.num_workers, settings.run.amp, quiet)

    train_metrics, evaluations = train_in_intervals(run, intervals, evaluate_now)
    return protocol_metrics(evaluations, used, encoder, classes, (train_split, train_data), (val_split, val_data),
                            train_metrics)
