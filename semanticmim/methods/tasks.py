"""What each method computes from a batch: the engine's loop calls `task.loss(module, batch, step)`.

MIM (BEiT, MaskFeat, both SemanticMIM variants): masks come with each sample (`WithMasks`, drawn in
the data workers from the sample's own seed, so they do not depend on batch layout, accumulation or
world size); compute the target on the training device in fp32 without gradients (HOG of the
normalised view; dVAE tokens of the 112-px view), predict the masked patches. MoCo v3: two views;
the momentum encoder moves once per optimizer step (`before_step`). dVAE: the step's Gumbel-softmax
temperature. Views arrive as uint8 pixels and are normalised here, on the training device
(`semanticmim.data.transforms`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from semanticmim.data.transforms import normalize, unit_range
from semanticmim.engine.loop import to_device
from semanticmim.engine.timing import no_timer
from semanticmim.errors import InputError
from semanticmim.models import MaskedImageModel, MaskGenerator
from semanticmim.models.mocov3 import MoCoV3, convert_sync_batchnorm
from semanticmim.targets import DalleTokenizer, HOGTarget
from semanticmim.targets.dvae import DiscreteVAE, temperature_schedule


def no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


class WithMasks:
    """Wraps a pretraining transform: image -> `(views, visible (N,) bool, masked (N,) bool)`.

    Runs inside the dataset, where the loader has seeded every RNG from (seed, epoch, index), so a
    sample's masks are a function of the sample alone, for folders and shards alike."""

    def __init__(self, transform: Callable, masks: MaskGenerator) -> None:
        self.transform, self.masks = transform, masks

    def __call__(self, image):
        visible, masked = self.masks(1)
        return self.transform(image), visible[0], masked[0]


@dataclass
class MIMTask:
    name: str
    model: MaskedImageModel
    hog: HOGTarget | None = None
    tokenizer: DalleTokenizer | None = None
    decoder: nn.Module | None = None  # our DiscreteVAE, when at hand: only for drawing reconstructions
    timer: Callable[[str], contextlib.AbstractContextManager] = no_timer  # set by the loop

    def __post_init__(self) -> None:
        if self.model.config.target == "dvae":
            if self.tokenizer is None:
                raise InputError(f"{self.name} predicts dVAE tokens but no tokenizer was given")
            self.tokenizer.eval().requires_grad_(False)
            if self.tokenizer.vocab_size != self.model.config.target_dim:
                raise InputError(f"tokenizer vocabulary {self.tokenizer.vocab_size} != model head "
                                 f"{self.model.config.target_dim}")
        elif self.hog is None:
            raise InputError(f"{self.name} predicts HOG but no HOGTarget was given")

    def targets(self, views) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 views (the model's (B, 3, H, W) [+ the tokenizer's (B, 3, H/2, W/2)]) on the device
        -> normalised images (B, 3, H, W) float32 and targets (B, N) tokens or (B, N, C) HOG."""
        with self.timer("targets"), torch.no_grad(), no_autocast(self.device):
            if self.model.config.target == "dvae":
                pixels, tokenizer_view = views
                return normalize(pixels), self.tokenizer(unit_range(tokenizer_view))
            images = normalize(views)
            return images, self.hog(images)

    @property
    def device(self) -> torch.device:
        return self.model.mask_token.device

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        """batch: ((views, visible (B, N) bool, masked (B, N) bool), labels)."""
        (views, visible, masked), _labels = to_device(batch, self.device)
        images, target = self.targets(views)
        if target.shape[1] != visible.shape[1]:
            raise InputError(f"target has {target.shape[1]} positions but the model has {visible.shape[1]} "
                             "patches; tokenizer grid and patch grid must match")
        return module(images, visible, masked, target)

    def to(self, device: torch.device) -> MIMTask:
        for part in (self.hog, self.tokenizer):
            if part is not None:
                part.to(device)
        return self


@dataclass
class MoCoTask:
    name: str
    model: MoCoV3
    total_steps: int
    base_momentum: float = 0.99

    def before_step(self, step: int) -> None:
        """The momentum encoder moves once per optimizer step, before its first micro-batch (as the
        official loop does once per iteration); under accumulation each micro-batch's queries take the
        keys of their own micro-batch (gathered over ranks) as negatives."""
        self.model.before_step(step, self.total_steps, self.base_momentum)

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        (view1, view2), _labels = to_device(batch, self.model.encoder.pos_embed.device)
        return module(normalize(view1), normalize(view2))

    def to(self, device: torch.device) -> MoCoTask:
        """SyncBatchNorm in projector/predictor under DDP on CUDA (per rank on CPU: gloo has none)."""
        self.model = convert_sync_batchnorm(self.model, device)
        return self


@dataclass
class DVAETask:
    name: str
    model: DiscreteVAE
    total_steps: int
    temperature_start: float = 1.0
    temperature_end: float = 1 / 16

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        pixels, _labels = to_device(batch, next(self.model.parameters()).device)
        images = unit_range(pixels)
        tau = temperature_schedule(step, self.total_steps, self.temperature_start, self.temperature_end)
        with no_autocast(images.device):
            loss, _stats = module(images, temperature=tau)
        return loss

    def to(self, device: torch.device) -> DVAETask:
        return self
