"""PascalVOC linear segmentation [paper Table 6, §4.2]: a 1x1 conv on the frozen patch tokens of one block.

Recipe — the paper's values, and where it is silent the authors' `seg_linear_probing.py` (built on
Leopart, Ziegler & Asano 2022); `SOURCES` names the source of every default and run.json records it:
input 448 with the position embedding interpolated (28x28 patches at 16 px) [paper]; block 6 [paper]
(the authors' code reads `--layer_indices -5`, the 8th block of 12, 1-based); the block's raw patch
tokens, no norm [authors' code: mmpretrain's `out_type="featmap"` of a block before the last]; training
views random-resized crop (0.8, 1) + flip [authors' code, Leopart]; for the loss the logits are
upsampled bilinearly and the labels resized (nearest) to 100x100 [paper]; SGD, momentum 0.9, 25
epochs, batch 120 [paper], lr 0.01 [paper] stated for a batch of 60 and scaled linearly with the
global batch [authors' code: `lr * batch / 60.`], weight decay 1e-4 [authors' code, Leopart] on every
parameter of the conv, lr × 0.1 every 10 epochs [authors' code: `StepLR(step_size=10)`, its default
gamma; the paper says "step"; Leopart drops once, at epoch 20], conv weights N(0, 0.01) and zero bias
[authors' code]; evaluation on 448x448 images and labels (image bilinear, label nearest), mIoU over
every class incl. background from the dataset-level confusion matrix, 255 ignored [paper]. Only the
conv is trained and saved; the encoder stays in eval mode, without gradients, bitwise unchanged.

The conv runs on the patch grid and its logits are upsampled: a 1x1 conv commutes with bilinear
upsampling (both linear, interpolation weights sum to 1), so this equals the authors' upsampling of
the features first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn
from torchvision.transforms import InterpolationMode

from semanticmim.data.layouts import SegmentationDataset
from semanticmim.data.transforms import VocLinearTrain
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import Evaluation, Plan, RunOptions, to_device, train
from semanticmim.engine.recipe import CropScale, Recipe, check_crop_scale
from semanticmim.errors import InputError
from semanticmim.eval.encoder import Encoder, Normalization, load_encoder
from semanticmim.eval.metrics import fingerprint, value_sources
from semanticmim.eval.segmentation.inference import evaluate_dataset
from semanticmim.eval.segmentation.protocol import (
    EncoderNormalized,
    evaluation_record,
    scaled_blocks,
    segmentation_loss,
    segmentation_result,
    training_details,
)
from semanticmim.eval.splits import read_splits
from semanticmim.settings import Strict

__all__ = ["SOURCES", "BlockFeatures", "LinearSegmentationTask", "Settings", "SquareEval", "StepSchedule", "evaluate"]

KEY = "eval.linear_seg"
PAPER_BLOCK, PAPER_INPUT, PAPER_TRAIN_RESOLUTION = 6, 448, 100  # [§4.2, Table 6]

SOURCES = {  # where each default comes from (run.json: `sources`, "params" where the params file set it)
    "block": "paper §4.2: block 6 of 12, scaled to the depth (authors' code: --layer_indices -5, block 8)",
    "feature_norm": "authors' code: raw block tokens (Leopart: DINO's final norm)",
    "img_size": "paper Table 6: 448 = 2x the pretraining size",
    "train_resolution": "paper Table 6: 100 at 448",
    "eval_resolution": "paper Table 6: 448",
    "crop_scale": "authors' code and Leopart: RandomResizedCrop scale (0.8, 1)",
    "epochs": "paper Table 6",
    "batch_size": "paper Table 6",
    "lr": "paper Table 6",
    "lr_batch": "authors' code: lr x global batch / 60",
    "momentum": "paper Table 6",
    "weight_decay": "authors' code and Leopart",
    "lr_step_epochs": "authors' code: StepLR(step_size=10) (paper: step; Leopart: 20)",
    "lr_gamma": "authors' code: StepLR's default gamma",
    "head_init_std": "authors' code: N(0, 0.01), zero bias",
    "eval_every": "ours (authors' code: every epoch)",
}


class Settings(Strict):
    """`eval.linear_seg` in params.yaml. None = derived from the encoder or the dataset (see comments)."""

    block: PositiveInt | None = None  # None: block 6 of 12 [§4.2] scaled to the depth (authors' code: 8)
    # "none": the block's raw tokens [authors' code]; "final": the encoder's trained final LayerNorm on them
    # (Leopart's DINO-style features); "parameter-free": a LayerNorm without affine
    feature_norm: Literal["none", "final", "parameter-free"] = "none"
    img_size: PositiveInt | None = None  # None: 2x the pretraining size, 448 at 224 [Table 6]
    train_resolution: PositiveInt | None = None  # None: img_size * 100/448, 100 at 448 [Table 6]
    eval_resolution: PositiveInt | None = None  # None: img_size, 448 [Table 6]
    crop_scale: CropScale = (0.8, 1.0)  # random-resized crop [authors' code, Leopart]
    epochs: PositiveInt = 25  # [Table 6]
    batch_size: PositiveInt = 120  # global [Table 6]
    per_device_batch: PositiveInt | None = None  # None: batch_size / world size; smaller -> accumulation
    lr: PositiveFloat = 0.01  # SGD [Table 6], stated for `lr_batch`, scaled linearly with the global batch
    lr_batch: PositiveInt = 60  # [authors' code: lr * batch / 60]: 0.02 at the paper's batch of 120
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # [Table 6]
    weight_decay: float = Field(1e-4, ge=0.0)  # [authors' code, Leopart]
    lr_step_epochs: PositiveInt = 10  # lr x lr_gamma every this many epochs [authors' code: StepLR(step_size=10)]
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0)  # [authors' code: StepLR's default]
    head_init_std: PositiveFloat | None = 0.01  # conv weights N(0, std), zero bias [authors' code]; None: PyTorch's
    eval_every: PositiveInt = 5  # epochs between evaluations; the last epoch is always evaluated
    eval_batch_size: PositiveInt = 16
    num_classes: PositiveInt | None = None  # None: the dataset's (21 for PascalVOC); else must match it
    train_split: str | None = None  # None: trainaug, else train [Table 6]
    val_split: str | None = None  # None: val
    num_workers: int = Field(2, ge=0)
    run: RunOptions = RunOptions()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        check_crop_scale(self.crop_scale)
        return self

    def recipe(self, world_size: int) -> Recipe:
        """The batch and lr arithmetic of the engine's recipe type (SGD: no warmup, no cosine, no betas)."""
        per_device = self.per_device_batch or math.ceil(self.batch_size / world_size)
        return Recipe(epochs=self.epochs, batch_size=self.batch_size, batch_per_device=per_device, lr=self.lr,
                      lr_batch=self.lr_batch, min_lr=0.0, warmup_epochs=0.0, weight_decay=self.weight_decay,
                      clip_grad=None, crop_scale=self.crop_scale)


# ----------------------------------------------------------------------------------------- model


class BlockFeatures(nn.Module):
    """A frozen encoder as a feature map: normalised images (B, 3, H, W) -> patch tokens of `block`
    (1-based), normalised per `norm`, as (B, D, H/p, W/p). Always in eval mode, never with gradients."""

    def __init__(self, encoder: Encoder, block: int, norm: str):
        super().__init__()
        encoder.check_block(block, f"{KEY}.block")
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


def build_task(encoder: Encoder, block: int, norm: str, num_classes: int, train_resolution: int,
               init_std: float | None = 0.01) -> LinearSegmentationTask:
    head = nn.Conv2d(encoder.embed_dim, num_classes, kernel_size=1)
    if init_std is not None:
        nn.init.normal_(head.weight, mean=0.0, std=init_std)
        nn.init.zeros_(head.bias)
    return LinearSegmentationTask(head, BlockFeatures(encoder, block, norm), train_resolution)


class StepSchedule:
    """PyTorch's StepLR in optimizer steps: lr = base · gamma^⌊step / every⌋ (updated every step)."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, every: int, gamma: float):
        self.optimizer, self.base_lr, self.every, self.gamma = optimizer, base_lr, every, gamma

    def lr_at(self, step: int) -> float:
        return self.base_lr * self.gamma ** (step // self.every)

    def step_update(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)


class SquareEval:
    """Evaluation view [Table 6; authors' code, Leopart]: image (bilinear, antialiased) and label
    (nearest) both resized to size x size, the image normalised with the encoder's mean/std.
    Returns (float32 (3, S, S), int64 (S, S))."""

    def __init__(self, size: int, normalization: Normalization = Normalization()):
        self.size, self.normalization = [size, size], normalization

    def __call__(self, image, label) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = TF.resize(TF.pil_to_tensor(image), self.size, InterpolationMode.BILINEAR, antialias=True)
        label = TF.resize(torch.as_tensor(label)[None], self.size, InterpolationMode.NEAREST)[0]
        return self.normalization(pixels), label.long()


# -------------------------------------------------------------------------------------- protocol


def evaluate(
    encoder_dir: Path, data_root: Path, layout: str, settings: Settings, out_dir: Path, env: DistEnv, quiet: bool
) -> dict:
    """Train the 1x1 conv and score it: `{"metrics", "run"}` (see `segmentation.protocol`), mIoU of the
    last epoch as the headline."""
    out_dir = Path(out_dir)
    pretrain_size = load_encoder(encoder_dir).model.patch_embed.img_size[0]  # validates the export first
    img_size = settings.img_size or 2 * pretrain_size
    encoder = load_encoder(encoder_dir, img_size=img_size, size_key=f"{KEY}.img_size")
    block = settings.block or scaled_blocks([PAPER_BLOCK], encoder.depth)[0]
    encoder.check_block(block, f"{KEY}.block")
    depth, patch = encoder.depth, encoder.model.patch_embed.patch_size[0]
    train_resolution = settings.train_resolution or round(img_size * PAPER_TRAIN_RESOLUTION / PAPER_INPUT)
    eval_resolution = settings.eval_resolution or img_size
    if eval_resolution % patch:
        raise InputError(f"{KEY}.eval_resolution={eval_resolution}: expected a multiple of the patch size {patch}")
    train_split, val_split = read_splits("segmentation", layout, data_root, settings.train_split,
                                         settings.val_split, settings.num_classes, KEY)
    classes = train_split.classes
    skips = out_dir / "skipped.jsonl"
    train_view = EncoderNormalized.wrap(VocLinearTrain(img_size, settings.crop_scale), encoder)
    train_data = SegmentationDataset(train_split, train_view, skip_report=skips)
    val_data = SegmentationDataset(val_split, SquareEval(eval_resolution, encoder.normalization), skip_report=skips)
    schedule, plan = settings.recipe(env.world_size).plan(len(train_data), env.world_size)

    torch.manual_seed(settings.run.seed)  # the same head init on every rank and every rerun
    task = build_task(encoder, block, settings.feature_norm, len(classes), train_resolution,
                      settings.head_init_std).to(env.device)

    def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay)

    def make_lr_schedule(optimizer: torch.optim.Optimizer, run_plan: Plan) -> StepSchedule:
        return StepSchedule(optimizer, schedule.lr, settings.lr_step_epochs * run_plan.steps_per_epoch,
                            settings.lr_gamma)

    def evaluate_now(_epoch: int) -> dict[str, float]:
        task.model.eval()
        scores = evaluate_dataset(task.infer, val_data, classes, env, settings.eval_batch_size,
                                  settings.num_workers, settings.run.amp, quiet)
        task.model.train()
        return evaluation_record(scores)

    identity = {"protocol": "linear-seg", "encoder": encoder.identity["sha256"],
                "normalization": [encoder.mean, encoder.std], "data": str(Path(data_root).resolve()),
                "format": layout, "splits": [train_split.name, val_split.name], "classes": classes,
                "block": block, "img_size": img_size, "train_resolution": train_resolution}
    used = {
        "block": block,
        "encoder_depth": depth,
        "feature_norm": settings.feature_norm,
        "img_size": img_size,
        "pos_embed_grid": img_size // patch,
        "train_resolution": train_resolution,
        "eval_resolution": eval_resolution,
        "crop_scale": list(settings.crop_scale),
        "normalization": {"mean": list(encoder.mean), "std": list(encoder.std)},
        "optimizer": "SGD",
        "lr": schedule.lr,
        "base_lr": settings.lr,
        "lr_batch": settings.lr_batch,
        "momentum": settings.momentum,
        "weight_decay": settings.weight_decay,
        "lr_schedule": f"step: x{settings.lr_gamma} every {settings.lr_step_epochs} epochs",
        "lr_step_steps": settings.lr_step_epochs * plan.steps_per_epoch,
        "lr_gamma": settings.lr_gamma,
        "head_init": f"N(0, {settings.head_init_std}), zero bias" if settings.head_init_std else "PyTorch default",
        "epochs": settings.epochs,
        "global_batch": plan.global_batch,
        "per_device_batch": plan.per_device_batch,
        "accumulation": plan.accumulation,
        "world_size": env.world_size,
        "steps": plan.total_steps,
        "steps_per_epoch": plan.steps_per_epoch,
        "num_classes": len(classes),
        "seed": settings.run.seed,
    }
    options = replace(settings.run, num_workers=settings.num_workers, quiet=quiet)
    trained = train(task, train_data, schedule, options, env, out_dir,
                    run_info={"protocol": "linear-seg", "used": used}, fingerprint=fingerprint(settings, **identity),
                    make_optimizer=make_optimizer, make_lr_schedule=make_lr_schedule,
                    evaluate=Evaluation(evaluate_now, settings.eval_every, "epoch"))
    return segmentation_result(trained["history"], classes, {
        "used": used,
        "sources": value_sources(settings, SOURCES),
        **training_details(encoder, train_split, val_split, train_data, val_data, trained, plan),
    })
