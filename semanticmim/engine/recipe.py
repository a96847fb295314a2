"""The recipe of a training run and the batch arithmetic derived from it.

`Recipe` is the one type for how long and how hard a run trains (pretraining, the dVAE and the
evaluation protocols extend it): the global batch (`batch_size`) and the per-device batch
(`batch_per_device`, the same names as in every params section), the lr stated at `lr_batch`
and scaled linearly with the global batch (the one place the lr is scaled), warmup, cosine floor, AdamW
hyper-parameters, clipping and the crop scale. `Recipe.plan(num_samples, world_size)` returns the
`Schedule` (lr already scaled) and the `Plan` (accumulation, steps). pydantic validates it directly
where it appears in a params schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from pydantic import ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt

from semanticmim.errors import InputError

CropScale = tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]]


def check_crop_scale(scale: tuple[float, float]) -> None:
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(scale)}")


@dataclass(frozen=True)
class Schedule:
    """How long and how hard to train, resolved for one run; the lr is already scaled to the global batch."""

    epochs: int
    batch_size: int  # per device
    effective_batch: int
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None
    steps: int | None = None  # a run measured in optimizer steps (e.g. UperNet's 160k); None: `epochs` epochs


@dataclass
class Plan:
    """Batch arithmetic, derived once and recorded in the outputs."""

    per_device_batch: int
    world_size: int
    accumulation: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    notes: list[str] = field(default_factory=list)


def plan_batches(schedule: Schedule, num_samples: int, world_size: int) -> Plan:
    """Accumulation makes the per-device batch up to the recipe's effective batch."""
    per_step = schedule.batch_size * world_size
    accumulation = max(1, round(schedule.effective_batch / per_step))
    global_batch = per_step * accumulation
    notes = []
    if global_batch != schedule.effective_batch:
        notes.append(f"effective batch {global_batch} differs from the recipe's {schedule.effective_batch} "
                     f"({schedule.batch_size} per device x {world_size} devices x {accumulation} accumulation)")
    steps_per_epoch = num_samples // world_size // (schedule.batch_size * accumulation)
    if steps_per_epoch < 1:
        raise InputError(f"dataset has {num_samples} images, fewer than one global batch of {global_batch}")
    total = schedule.steps or steps_per_epoch * schedule.epochs
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    return Plan(schedule.batch_size, world_size, accumulation, global_batch, steps_per_epoch, total, warmup, notes)


@dataclass(frozen=True)
class Recipe:
    """One training recipe (defaults: the paper's Table 2 pretraining values common to BEiT and MaskFeat)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    epochs: PositiveInt = 300
    batch_size: PositiveInt = 2048  # the recipe's global batch; gradient accumulation makes it up
    batch_per_device: PositiveInt | None = None  # what fits; None: batch_size / world size
    lr: PositiveFloat = 1.5e-3
    lr_batch: PositiveInt = 2048  # `lr` is stated for this global batch and scaled linearly from it
    min_lr: NonNegativeFloat = 1e-5
    warmup_epochs: NonNegativeFloat = 10.0
    weight_decay: NonNegativeFloat = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    clip_grad: PositiveFloat | None = 3.0
    crop_scale: CropScale = (0.08, 1.0)

    def __post_init__(self) -> None:
        check_crop_scale(self.crop_scale)

    def scaled_lr(self, global_batch: int) -> float:
        """The recipe's lr rule: linear in the global batch, from `lr` at `lr_batch`."""
        return self.lr * global_batch / self.lr_batch

    def per_device(self, world_size: int) -> int:
        return self.batch_per_device or max(1, self.batch_size // world_size)

    def plan(self, num_samples: int, world_size: int) -> tuple[Schedule, Plan]:
        """The schedule (lr scaled to the global batch the plan reaches) and the batch plan of a run."""
        schedule = Schedule(self.epochs, self.per_device(world_size), self.batch_size, 0.0, self.min_lr,
                            self.warmup_epochs, self.weight_decay, tuple(self.betas), self.eps, self.clip_grad)
        plan = plan_batches(schedule, num_samples, world_size)
        return Schedule(**{**vars(schedule), "lr": self.scaled_lr(plan.global_batch)}), plan
