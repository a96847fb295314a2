"""MaskFeat's HOG target: a port of mmpretrain's `HOGGenerator`, generalised to any patch/cell size.

The algorithm is mmpretrain's (itself from SlowFast), kept exact including its quirks:

- gradients of each RGB channel with the Sobel-like kernel `[[1,0,-1],[2,0,-2],[1,0,-1]]` (and its
  transpose) after a 1-pixel reflect pad, so `gx = x[:, j-1] - x[:, j+1]` smoothed vertically;
- orientation `atan2(gx, gy)` — note the argument order — scaled to `[-nbins, nbins]` and folded into
  `nbins` unsigned bins of `180/nbins` degrees by `floor(.) mod nbins`: no interpolation between bins.
  With this order a vertical edge (intensity changing along x) lands in bin `nbins // 2` and a
  horizontal edge in bin 0;
- magnitudes weighted by a Gaussian window (size `window_size`, std `window_size // 2`, sum 1) tiled
  over the image, then summed per `cell_size` x `cell_size` cell;
- each cell's histogram L2-normalised over its bins, per channel (eps 1e-12, as `F.normalize`).

mmpretrain hard-codes 14 patches per side (224 / 16); here the grid comes from `patch_size`.

Inherited fp32 quirks: a derivative that is 0 in exact arithmetic (flat regions, and the first/last
row or column where the reflect pad mirrors the neighbour) can come out of the fp32 convolution as
+-1 ulp. An angle of exactly 0/180 degrees can then land in the first or the last bin, and a cell with
no real gradient (a flat, non-zero region) is normalised from rounding noise to unit length instead of
staying zero. mmpretrain's targets do the same; the MSE loss simply cannot predict those cells.

Differences from `skimage.feature.hog` (checked in `tests/test_hog.py`): Sobel smoothing instead of the
plain `[-1, 0, 1]` difference; borders use the reflect pad instead of zero gradients; bin edges sit at
multiples of `180/nbins` in the rotated angle `atan2(gx, gy)`, i.e. half a bin away from skimage's edges
in its `atan2(g_row, g_col)`; one normalisation per cell with eps 1e-12 instead of skimage's blocks
with eps 1e-5; skimage works on one grayscale image, this works per colour channel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from semanticmim.errors import InputError

__all__ = ["HOGTarget", "gaussian_window"]


def gaussian_window(size: int) -> torch.Tensor:
    """(size, size) Gaussian weights with std `size // 2`, summing to 1 (mmpretrain's kernel)."""
    n = torch.arange(size, dtype=torch.float32)
    n = (n - n.mean()) / (size // 2)
    weights_1d = torch.exp(-0.5 * n**2)
    weights_2d = weights_1d[:, None] * weights_1d[None, :]
    return weights_2d / weights_2d.sum()


def _sobel_kernels(channels: int = 3) -> torch.Tensor:
    """(2 * channels, 1, 3, 3): per channel the x kernel then its transpose (one grouped conv)."""
    weight_x = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    pair = torch.stack([weight_x, weight_x.t()])
    return pair.repeat(channels, 1, 1).unsqueeze(1).contiguous()


class HOGTarget(nn.Module):
    """Per-patch HOG features, the MaskFeat regression target.

    Args:
        nbins: orientation bins over 180 degrees.
        cell_size: pixels per side of a histogram cell.
        patch_size: pixels per side of a ViT patch; a multiple of `cell_size`.
        window_size: side of the Gaussian weighting window tiled over the image; None or 0 disables it.

    `forward(images: (B, 3, H, W)) -> (B, N, 3 * nbins * (patch_size // cell_size) ** 2)` with
    N = (H / patch_size) * (W / patch_size) patches in raster order, each flattened as
    (channel, bin, cell_row, cell_col). Defaults give 108 values per 16x16 patch. Computed in fp32
    without gradients, also under autocast. Expects the *normalised* image, as MaskFeat does.
    """

    def __init__(self, nbins: int = 9, cell_size: int = 8, patch_size: int = 16, window_size: int | None = 16) -> None:
        super().__init__()
        _check_config(nbins, cell_size, patch_size, window_size)
        self.nbins = nbins
        self.cell_size = cell_size
        self.patch_size = patch_size
        self.window_size = window_size or 0
        # Constants, not state: kept out of state_dict so that models holding a target load unchanged.
        self.register_buffer("sobel", _sobel_kernels(), persistent=False)
        window = gaussian_window(self.window_size) if self.window_size else torch.empty(0)
        self.register_buffer("window", window, persistent=False)

    @property
    def cells_per_patch(self) -> int:
        return self.patch_size // self.cell_size

    @property
    def out_dim(self) -> int:
        """Values per patch: 3 * nbins * cells_per_patch ** 2."""
        return 3 * self.nbins * self.cells_per_patch**2

    def extra_repr(self) -> str:
        return (
            f"nbins={self.nbins}, cell_size={self.cell_size}, patch_size={self.patch_size}, "
            f"window_size={self.window_size or None}"
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) -> (B, N, out_dim) float32."""
        self._check_images(images)
        with torch.autocast(images.device.type, enabled=False):
            magnitude, bins = self.gradients(images.float())
            if self.window_size:
                height, width = magnitude.shape[-2:]
                tiles = (height // self.window_size, width // self.window_size)
                magnitude = magnitude * self.window.repeat(tiles)
            histograms = F.normalize(self.cell_histograms(magnitude, bins), p=2, dim=-1)
            return self.patchify(histograms)

    def gradients(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, 3, H, W) -> magnitude (B, 3, H, W) float, orientation bin (B, 3, H, W) long."""
        batch, channels, height, width = images.shape
        padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
        gradient = F.conv2d(padded, self.sobel, groups=channels).view(batch, channels, 2, height, width)
        gx, gy = gradient.unbind(2)
        phase = torch.atan2(gx, gy) / math.pi * self.nbins  # in [-nbins, nbins]
        bins = torch.remainder(torch.floor(phase), self.nbins).long()
        return torch.hypot(gx, gy), bins

    def cell_histograms(self, magnitude: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """magnitude, bins: (B, 3, H, W) -> (B, 3, H / cell, W / cell, nbins) summed magnitudes.

        One scatter-add straight into the cell histograms: same sums as mmpretrain's per-pixel
        (B, 3, nbins, H, W) histogram followed by sum-pooling, in 1/nbins of the memory.
        """
        batch, channels, height, width = magnitude.shape
        rows, cols = height // self.cell_size, width // self.cell_size
        cell_row = torch.arange(height, device=bins.device) // self.cell_size
        cell_col = torch.arange(width, device=bins.device) // self.cell_size
        cell_index = (cell_row[:, None] * cols + cell_col[None, :]) * self.nbins
        index = (cell_index + bins).view(batch * channels, height * width)
        histograms = magnitude.new_zeros(batch * channels, rows * cols * self.nbins)
        histograms.scatter_add_(1, index, magnitude.reshape(batch * channels, height * width))
        return histograms.view(batch, channels, rows, cols, self.nbins)

    def patchify(self, histograms: torch.Tensor) -> torch.Tensor:
        """(B, 3, H / cell, W / cell, nbins) -> (B, N, 3 * nbins * cells_per_patch ** 2)."""
        batch, channels, rows, cols, nbins = histograms.shape
        per_patch = self.cells_per_patch
        grid = histograms.view(batch, channels, rows // per_patch, per_patch, cols // per_patch, per_patch, nbins)
        # -> (B, patch_row, patch_col, channel, bin, cell_row, cell_col): mmpretrain's flattening order.
        grid = grid.permute(0, 2, 4, 1, 6, 3, 5)
        return grid.reshape(batch, (rows // per_patch) * (cols // per_patch), -1)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"HOGTarget images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise InputError(f"HOGTarget images: expected a float tensor, got {images.dtype}")
        height, width = images.shape[-2:]
        for name, size in (("height", height), ("width", width)):
            if size % self.patch_size:
                raise InputError(f"HOGTarget images: {name} {size} is not divisible by patch_size {self.patch_size}")
            if self.window_size and size % self.window_size:
                raise InputError(f"HOGTarget images: {name} {size} is not divisible by window_size {self.window_size}")
            if size < 2:
                raise InputError(f"HOGTarget images: {name} {size} is too small for the 3x3 gradient")


def _check_config(nbins: int, cell_size: int, patch_size: int, window_size: int | None) -> None:
    if nbins < 1:
        raise InputError(f"HOGTarget nbins: expected >= 1, got {nbins}")
    if cell_size < 1 or patch_size < 1:
        raise InputError(f"HOGTarget cell_size/patch_size: expected >= 1, got {cell_size}/{patch_size}")
    if patch_size % cell_size:
        raise InputError(f"HOGTarget patch_size {patch_size} is not divisible by cell_size {cell_size}")
    if window_size is not None and window_size != 0 and window_size < 2:
        raise InputError(f"HOGTarget window_size: expected None, 0 (off) or >= 2, got {window_size}")
