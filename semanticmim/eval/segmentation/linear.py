"""PascalVOC linear segmentation [paper Table 6, §4.2]: a 1x1 conv on the frozen patch tokens of one block.

Recipe (the protocol of Leopart, Ziegler & Asano 2022, which the paper follows): input 448 with the
position embedding interpolated (28x28 patches at 16 px), random-resized crop + flip; for the loss the
logits are upsampled bilinearly and the labels resized (nearest) to 100x100; SGD lr 0.01, momentum 0.9,
no weight decay, step schedule, 25 epochs, batch 120; evaluation on 448x448 images and labels (image
bilinear, label nearest), mIoU over every class incl. background from the dataset-level confusion
matrix, 255 ignored. Only the conv is trained and saved; the encoder stays in eval mode, without
gradients, bitwise unchanged.

The conv runs on the patch grid and its logits are upsampled: a 1x1 conv commutes with bilinear
upsampling (both linear, interpolation weights sum to 1), so this equals upsampling the features first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn
from torchvision.transforms import InterpolationMode

from semanticmim.config import RunParams
from semanticmim.data.layouts import SegmentationDataset
from semanticmim.data.transforms import VocLinearTrain, normalize
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import Plan, RunOptions, Schedule, plan_batches
from semanticmim.engine.tasks import to_device
from semanticmim.errors import InputError
from semanticmim.eval.encoder import Encoder, load_encoder
from semanticmim.eval.segmentation.inference import evaluate_dataset
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

__all__ = ["BlockFeatures", "LinearSegmentationTask", "Settings", "SquareEval", "StepSchedule", "evaluate"]

PAPER_INPUT, PAPER_TRAIN_RESOLUTION = 448, 100  # [Table 6]


class Settings(Strict):
    """`eval.linear_seg` in params.yaml. None = derived from the encoder or the dataset (see comments)."""

    block: PositiveInt | None = None  # None: block 6 of 12 [§4.2] scaled to the depth (authors' code: 7)
    # the encoder's own final LayerNorm on the block's tokens, as the DINO-style `get_intermediate_layers` of
    # Leopart's code does; the paper does not say ("parameter-free": LN without affine; "none": raw tokens)
    feature_norm: Literal["final", "parameter-free", "none"] = "final"
    img_size: PositiveInt | None = None  # None: 2x the pretraining size, 448 at 224 [Table 6]
    train_resolution: PositiveInt | None = None  # None: img_size * 100/448, 100 at 448 [Table 6]
    eval_resolution: PositiveInt | None = None  # None: img_size, 448 [Table 6]
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized crop; the paper does not give it (guess)
    epochs: PositiveInt = 25  # [Table 6]
    batch_size: PositiveInt = 120  # global [Table 6]
    per_device_batch: PositiveInt | None = None  # None: batch_size / world size; smaller -> accumulation
    lr: PositiveFloat = 0.01  # SGD [Table 6]
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # [Table 6]
    weight_decay: float = Field(0.0, ge=0.0)  # none [Table 6]
    # "Step" [Table 6] without its steps: lr x gamma at these fractions of training (Leopart drops once)
    lr_milestones: tuple[float, ...] = (0.8,)
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0)
    eval_every: PositiveInt = 5  # epochs between evaluations; the last epoch is always evaluated
    eval_batch_size: PositiveInt = 16
    num_classes: PositiveInt | None = None  # None: the dataset's (21 for PascalVOC); else must match it
    train_split: str | None = None  # None: trainaug, else train [Table 6]
    val_split: str | None = None  # None: val
    num_workers: int = Field(2, ge=0)
    run: RunParams = RunParams()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not all(0.0 < m < 1.0 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones are fractions of training in (0, 1), got {self.lr_milestones}")
        return self


# ----------------------------------------------------------------------------------------- model


class BlockFeatures(nn.Module):
    """A frozen encoder as a feature map: images (B, 3, H, W) -> patch tokens of `block` (1-based),
    normalised per `norm`, as (B, D, H/p, W/p). Always in eval mode, never with gradients."""

    def __init__(self, encoder: Encoder, block: int, norm: str):
        super().__init__()
        encoder.check_block(block, "eval.linear_seg.block")
        encoder.model.prune_intermediate_layers([block - 1], prune_norm=norm != "final", prune_head=True)
        self.encoder, self.block, self.norm = encoder, block, norm
        self.vit = encoder.model.eval().requires_grad_(False)  # registered: moves with .to(device)
        self.patch_size = self.vit.patch_embed.patch_size[0]
        self.eval()

    def train(self, mode: bool = True) -> BlockFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        ((_prefix, patches),) = self.encoder.block_tokens(images, [self.block])
        if self.norm == "final":
            patches = self.vit.norm(patches)
        elif self.norm == "parameter-free":
            patches = F.layer_norm(patches, patches.shape[-1:])
        height, width = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], height, width)


@dataclass
class LinearSegmentationTask:
    """The loss of the 1x1 conv (`model`, all that is trained and saved) on frozen `features`."""

    model: nn.Conv2d
    features: BlockFeatures
    train_resolution: int
    name: str = "linear-seg"

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        """batch: images (B, 3, S, S), labels (B, S, S) -> cross-entropy at train_resolution^2."""
        images, labels = to_device(batch, self.model.weight.device)
        size = [self.train_resolution] * 2
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        return segmentation_loss(module(self.features(images)), labels)

    def infer(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> logits (B, C, H/p, W/p) (the evaluation resizes them to the labels)."""
        return self.model(self.features(images))

    def to(self, device: torch.device) -> LinearSegmentationTask:
        self.features.to(device)
        return self


def build_task(
    encoder: Encoder, block: int, norm: str, num_classes: int, train_resolution: int
) -> LinearSegmentationTask:
    head = nn.Conv2d(encoder.embed_dim, num_classes, kernel_size=1)
    return LinearSegmentationTask(head, BlockFeatures(encoder, block, norm), train_resolution)


class StepSchedule:
    """lr = base · gamma^(milestones passed), milestones in optimizer steps (updated every step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, milestones: list[int], gamma: float):
        self.optimizer, self.base_lr, self.milestones, self.gamma = optimizer, base_lr, milestones, gamma

    def step_update(self, step: int) -> None:
        lr = self.base_lr * self.gamma ** sum(step >= milestone for milestone in self.milestones)
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class SquareEval:
    """Evaluation view [Table 6; Leopart]: image (bilinear, antialiased) and label (nearest) both resized
    to size x size. Returns (float32 (3, S, S) normalised, int64 (S, S))."""

    def __init__(self, size: int):
        self.size = [size, size]

    def __call__(self, image, label) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = TF.resize(TF.pil_to_tensor(image), self.size, InterpolationMode.BILINEAR, antialias=True)
        label = TF.resize(torch.as_tensor(label)[None], self.size, InterpolationMode.NEAREST)[0]
        return normalize(pixels), label.long()


# -------------------------------------------------------------------------------------- protocol


def evaluate(
    encoder_dir: Path, data_root: Path, data_format: str, settings: Settings, out_dir: Path, env: DistEnv, quiet: bool
) -> dict:
    """Train the 1x1 conv and score it; returns metrics (mIoU of the last epoch as the headline)."""
    pretrain_size = load_encoder(encoder_dir).model.patch_embed.img_size[0]  # validates the export first
    img_size = settings.img_size or 2 * pretrain_size
    encoder = load_encoder(encoder_dir, img_size=img_size)
    block = settings.block or scaled_blocks([6], encoder.depth)[0]
    encoder.check_block(block, "eval.linear_seg.block")
    depth, patch = encoder.depth, encoder.model.patch_embed.patch_size[0]
    train_resolution = settings.train_resolution or round(img_size * PAPER_TRAIN_RESOLUTION / PAPER_INPUT)
    eval_resolution = settings.eval_resolution or img_size
    for key, size in (("img_size", img_size), ("eval_resolution", eval_resolution)):
        if size % patch:
            raise InputError(f"eval.linear_seg.{key}={size}: expected a multiple of the patch size {patch}")
    train_split, val_split = read_splits(
        data_format, data_root, settings.train_split, settings.val_split, settings.num_classes
    )
    classes = train_split.classes
    skips = out_dir / "skipped.jsonl"
    train_data = SegmentationDataset(train_split, VocLinearTrain(img_size, settings.crop_scale), skip_report=skips)
    val_data = SegmentationDataset(val_split, SquareEval(eval_resolution), skip_report=skips)

    per_device = settings.per_device_batch or math.ceil(settings.batch_size / env.world_size)
    schedule = Schedule(
        epochs=settings.epochs,
        batch_size=per_device,
        effective_batch=settings.batch_size,
        lr=settings.lr,
        min_lr=0.0,
        warmup_epochs=0.0,
        weight_decay=settings.weight_decay,
    )
    plan = plan_batches(schedule, len(train_data), env.world_size)
    milestones = [round(m * settings.epochs) * plan.steps_per_epoch for m in settings.lr_milestones]
    used = {
        "block": block,
        "encoder_depth": depth,
        "feature_norm": settings.feature_norm,
        "img_size": img_size,
        "pos_embed_grid": img_size // patch,
        "train_resolution": train_resolution,
        "eval_resolution": eval_resolution,
        "crop_scale": list(settings.crop_scale),
        "optimizer": "SGD",
        "lr": settings.lr,
        "momentum": settings.momentum,
        "weight_decay": settings.weight_decay,
        "lr_schedule": "step",
        "lr_milestone_steps": milestones,
        "lr_gamma": settings.lr_gamma,
        "epochs": settings.epochs,
        "global_batch": plan.global_batch,
        "per_device_batch": per_device,
        "accumulation": plan.accumulation,
        "world_size": env.world_size,
        "steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "num_classes": len(classes),
        "seed": settings.run.seed,
    }

    torch.manual_seed(settings.run.seed)  # the same head init on every rank and every rerun
    task = build_task(encoder, block, settings.feature_norm, len(classes), train_resolution).to(env.device)

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )

    def make_lr_schedule(optimizer: torch.optim.Optimizer, _plan: Plan) -> StepSchedule:
        return StepSchedule(optimizer, settings.lr, milestones, settings.lr_gamma)

    fingerprint = settings_fingerprint(
        protocol="linear-seg",
        settings=settings,
        encoder=encoder.identity["sha256"],
        data=str(data_root),
        format=data_format,
        splits=[train_split.name, val_split.name],
        classes=classes,
        block=block,
        img_size=img_size,
        train_resolution=train_resolution,
    )
    options = RunOptions(**settings.run.model_dump(), num_workers=settings.num_workers, quiet=quiet)
    run = TrainingRun(
        task,
        schedule,
        options,
        env,
        out_dir,
        {"protocol": "linear-seg", "used": used},
        fingerprint,
        make_optimizer,
        make_lr_schedule,
    )
    ends = [*range(settings.eval_every, settings.epochs, settings.eval_every), settings.epochs]
    intervals = [Interval(end, {"epoch": end}, train_data) for end in ends]

    def evaluate_now() -> dict:
        return evaluate_dataset(
            task.infer, val_data, classes, env, settings.eval_batch_size, settings.num_workers, settings.run.amp, quiet
        )

    train_metrics, evaluations = train_in_intervals(run, intervals, evaluate_now)
    return protocol_metrics(evaluations, used, encoder, classes, (train_split, train_data), (val_split, val_data),
                            train_metrics)
