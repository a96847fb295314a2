"""ADE20K UperNet fine-tuning [paper Table 4 + BEiT's mmseg config]: the whole encoder and an UperNet
decoder (`decoder.py`) trained end to end, scored with sliding-window inference.

Recipe: blocks 4/6/8/12 -> feature pyramid -> UperHead (PPM 1/2/3/6, 768 channels) + auxiliary FCN
head on block 8 (weight 0.4); AdamW lr 3e-5, betas (0.9, 0.999), wd 0.05 (none on norms, biases,
tokens, position embeddings), layer-wise lr decay 0.9, linear warmup over 1500 steps then linear
decay to 0, 160k steps at batch 16, stochastic depth 0.1; 640x640 crops of images randomly resized
into (2560, 640) x 0.5-2 (cat_max_ratio 0.75), flip, photometric distortion; evaluation on the image
resized into (2560, 640), 640x640 windows every 426 px, logits resized to the label; single scale.

Iterations, not epochs: the run lasts `steps` optimizer steps (the engine's `Schedule(steps=...)`),
iterating the training set in as many seeded shuffled epochs as that takes, and evaluates every
`eval_interval` steps and after the last one. The lr is Table 4's at its batch of 16 (mmseg scales
nothing): `batch_size` is the batch it is stated for. Layer decay is `semanticmim.eval.layer_decay`'s,
shared with classification fine-tuning. Views are normalised with the encoder's own mean/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn

from semanticmim.data.layouts import SegmentationDataset
from semanticmim.data.transforms import AdeTrain, SegmentationEval
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import Evaluation, Plan, RunOptions, to_device, train
from semanticmim.engine.recipe import Recipe, Schedule, plan_batches
from semanticmim.eval.encoder import load_encoder
from semanticmim.eval.layer_decay import layer_decay_groups, layer_lr_scales
from semanticmim.eval.metrics import fingerprint
from semanticmim.eval.segmentation.decoder import FCNHead, UperHead, UperNetSegmenter, ViTPyramid
from semanticmim.eval.segmentation.inference import evaluate_dataset, slide_inference
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

__all__ = ["Settings", "UperNetTask", "WarmupPolySchedule", "build_segmenter", "evaluate", "layer_decay_groups"]

KEY = "eval.finetune_seg"
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
    eval_interval: PositiveInt = 16_000  # steps between evaluations [mmseg 160k schedule]; the last is always one
    eval_batch_size: PositiveInt = 8  # sliding windows per forward pass
    num_classes: PositiveInt | None = None  # None: the dataset's (150 for ADE20K); else must match it
    train_split: str | None = None  # None: training / train
    val_split: str | None = None  # None: validation / val
    num_workers: int = Field(2, ge=0)
    run: RunOptions = RunOptions()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not 0.0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        return self

    def recipe(self, world_size: int) -> Recipe:
        """The batch and lr arithmetic of the engine's recipe type; the lr is stated for `batch_size`
        (Table 4's 16; mmseg scales nothing) and the warmup is in steps (`warmup_steps`), not epochs."""
        per_device = self.per_device_batch or math.ceil(self.batch_size / world_size)
        return Recipe(epochs=1, batch_size=self.batch_size, batch_per_device=per_device, lr=self.lr,
                      lr_batch=self.batch_size, min_lr=self.min_lr, warmup_epochs=0.0,
                      weight_decay=self.weight_decay, betas=self.betas, eps=self.eps, clip_grad=None)

    def schedule(self, num_samples: int, world_size: int) -> tuple[Schedule, Plan]:
        """(Schedule, Plan) of a run of `steps` optimizer steps (epochs: as many as that takes)."""
        schedule, _ = self.recipe(world_size).plan(num_samples, world_size)
        schedule = replace(schedule, steps=self.steps)
        plan = plan_batches(schedule, num_samples, world_size)
        return replace(schedule, epochs=math.ceil(self.steps / plan.steps_per_epoch)), plan


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


# ------------------------------------------------------------------------------------ optimizer


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
    encoder_dir: Path, data_root: Path, layout: str, settings: Settings, out_dir: Path, env: DistEnv, quiet: bool
) -> dict:
    """Fine-tune encoder + UperNet and score it: `{"metrics", "run"}` (see `segmentation.protocol`), mIoU
    after the last step as the headline."""
    out_dir = Path(out_dir)
    encoder = load_encoder(encoder_dir, img_size=settings.crop_size, size_key=f"{KEY}.crop_size",
                           drop_path_rate=settings.drop_path)
    depth, patch = encoder.depth, encoder.model.patch_embed.patch_size[0]
    blocks = settings.blocks or scaled_blocks(PAPER_BLOCKS, depth)
    for block in blocks:
        encoder.check_block(block, f"{KEY}.blocks")
    stride = settings.slide_stride or settings.crop_size * 2 // 3
    train_split, val_split = read_splits("segmentation", layout, data_root, settings.train_split,
                                         settings.val_split, settings.num_classes, KEY)
    classes = train_split.classes
    skips = out_dir / "skipped.jsonl"
    train_view = AdeTrain(settings.crop_size, settings.ratio_range, settings.cat_max_ratio)
    train_data = SegmentationDataset(train_split, EncoderNormalized.wrap(train_view, encoder), skip_report=skips)
    val_view = EncoderNormalized.wrap(SegmentationEval(settings.crop_size), encoder)
    val_data = SegmentationDataset(val_split, val_view, skip_report=skips)
    schedule, plan = settings.schedule(len(train_data), env.world_size)

    torch.manual_seed(settings.run.seed)  # the same decoder init on every rank and every rerun
    model = build_segmenter(encoder.model, blocks, len(classes), settings).train()
    if env.distributed and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's SyncBN: BN over the global batch
    task = UperNetTask(model, settings.aux_weight)

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        groups = layer_decay_groups(module, settings.weight_decay, settings.layer_decay)
        return torch.optim.AdamW(groups, lr=schedule.lr, betas=settings.betas, eps=settings.eps,
                                 fused=env.device.type in ("cpu", "cuda"))

    def make_lr_schedule(optimizer: torch.optim.Optimizer, run_plan: Plan) -> WarmupPolySchedule:
        return WarmupPolySchedule(optimizer, schedule.lr, run_plan.total_steps, settings.warmup_steps, settings.min_lr)

    def infer(images: torch.Tensor) -> torch.Tensor:
        return slide_inference(model.predict, images, settings.crop_size, stride, settings.eval_batch_size)

    def evaluate_now(_step: int) -> dict[str, float]:
        model.eval()
        scores = evaluate_dataset(infer, val_data, classes, env, 1, settings.num_workers, settings.run.amp, quiet)
        model.train()
        return evaluation_record(scores)

    used = {
        "blocks": list(blocks),
        "encoder_depth": depth,
        "crop_size": settings.crop_size,
        "pos_embed_grid": settings.crop_size // patch,
        "normalization": {"mean": list(encoder.mean), "std": list(encoder.std)},
        "eval_scale": [4 * settings.crop_size, settings.crop_size],
        "slide_window": settings.crop_size,
        "slide_stride": stride,
        "decoder_channels": settings.decoder_channels,
        "pool_scales": list(settings.pool_scales),
        "aux_channels": settings.aux_channels,
        "aux_weight": settings.aux_weight,
        "optimizer": "AdamW",
        "lr": schedule.lr,
        "weight_decay": settings.weight_decay,
        "layer_decay": settings.layer_decay,
        "layer_lr_scales": layer_lr_scales(len(model.backbone.vit.blocks), settings.layer_decay),
        "betas": list(settings.betas),
        "lr_schedule": "linear warmup + poly(1.0)",
        "warmup_steps": settings.warmup_steps,
        "steps": plan.total_steps,
        "epochs": schedule.epochs,
        "eval_interval": settings.eval_interval,
        "global_batch": plan.global_batch,
        "per_device_batch": plan.per_device_batch,
        "accumulation": plan.accumulation,
        "world_size": env.world_size,
        "drop_path": settings.drop_path,
        "num_classes": len(classes),
        "seed": settings.run.seed,
    }
    identity = {"protocol": "finetune-seg", "encoder": encoder.identity["sha256"],
                "normalization": [encoder.mean, encoder.std], "data": str(Path(data_root).resolve()),
                "format": layout, "classes": classes, "blocks": blocks,
                "splits": [train_split.name, val_split.name]}
    options = replace(settings.run, num_workers=settings.num_workers, quiet=quiet)
    trained = train(task, train_data, schedule, options, env, out_dir,
                    run_info={"protocol": "finetune-seg", "used": used}, fingerprint=fingerprint(settings, **identity),
                    make_optimizer=make_optimizer, make_lr_schedule=make_lr_schedule,
                    evaluate=Evaluation(evaluate_now, settings.eval_interval, "step"))
    return segmentation_result(trained["history"], classes, {
        "used": used,
        **training_details(encoder, train_split, val_split, train_data, val_data, trained, plan),
    })
