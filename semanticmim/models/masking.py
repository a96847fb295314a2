"""Uniform random patch masking with exact per-image counts, so every tensor stays rectangular."""

from __future__ import annotations

import math

import torch

from semanticmim.errors import InputError


def num_masked(num_patches: int, ratio: float) -> int:
    """`ceil(N * r)`: 79, 118, 157 of 196 patches for r = 0.4, 0.6, 0.8 (rounded first so 0.7 * 10 is 7)."""
    if not 0.0 < ratio < 1.0:
        raise InputError(f"mask ratio must be in (0, 1), got {ratio}")
    return math.ceil(round(num_patches * ratio, 6))


def random_mask(
    batch_size: int, num_patches: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, N) bool with exactly `ceil(N * ratio)` True per row, positions uniform at random."""
    count = num_masked(num_patches, ratio)
    noise = torch.rand(batch_size, num_patches, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < count


class MaskGenerator:
    """Draws `(visible, masked)` patch masks, each (B, N) bool.

    Shared mask (default, BEiT/MaskFeat/SemanticMIM): `masked` has `ceil(N * mask_ratio)` patches and
    `visible = ~masked`. Separate masks (`img_mask_ratio` given; the paper's future work, §6): the IMG
    stream hides `ceil(N * img_mask_ratio)` patches and the MASK stream predicts `ceil(N * mask_ratio)`
    patches drawn independently, so a predicted patch may also be visible.
    """

    def __init__(self, num_patches: int, mask_ratio: float, img_mask_ratio: float | None = None) -> None:
        if num_patches < 2:
            raise InputError(f"num_patches must be >= 2, got {num_patches}")
        self.num_patches = num_patches
        self.mask_ratio = mask_ratio
        self.img_mask_ratio = img_mask_ratio
        self.num_masked = num_masked(num_patches, mask_ratio)
        hidden = num_masked(num_patches, img_mask_ratio) if img_mask_ratio is not None else self.num_masked
        self.num_visible = num_patches - hidden
        if self.num_masked >= num_patches or self.num_visible < 1:
            raise InputError(f"mask ratio {mask_ratio} leaves no visible patch of {num_patches}")

    def __call__(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        masked = random_mask(batch_size, self.num_patches, self.mask_ratio, generator)
        if self.img_mask_ratio is None:
            return ~masked, masked
        hidden = random_mask(batch_size, self.num_patches, self.img_mask_ratio, generator)
        return ~hidden, masked
