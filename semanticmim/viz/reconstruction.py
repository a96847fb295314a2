"""What a MIM model predicts for its masked patches, drawn next to the target.

MaskFeat: HOG histograms drawn as oriented-edge glyphs (skimage-style), target vs prediction, the
visible patches showing the target. BEiT: the dVAE tokens decoded back to pixels when a decoder is at
hand, else the masked patches coloured by whether the predicted token is the target token.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from semanticmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def edge_glyphs(nbins: int, size: int) -> np.ndarray:
    """(nbins, size, size) line images: bin b's edge direction through the cell centre.

    HOGTarget's bin b holds gradients whose angle `atan2(gx, gy)` is in [b, b+1)·180/nbins; the edge
    runs perpendicular to the gradient, at -(b + 0.5)·180/nbins degrees (y pointing down)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    glyphs = np.zeros((nbins, size, size), np.float32)
    for b in range(nbins):
        theta = -math.radians((b + 0.5) * 180 / nbins)
        distance = np.abs(-math.sin(theta) * xx + math.cos(theta) * yy)
        glyphs[b] = np.clip(1.0 - distance, 0.0, 1.0)
    return glyphs


def render_hog(hog: torch.Tensor, grid: int, nbins: int, cells_per_patch: int, glyph: int = 8) -> np.ndarray:
    """hog: (N, 3 * nbins * c * c) one image's patches -> (H, W) glyph image, channels summed."""
    c = cells_per_patch
    values = hog.float().view(grid, grid, 3, nbins, c, c).sum(2)  # (gy, gx, bins, cy, cx)
    values = values.permute(0, 3, 1, 4, 2).reshape(grid * c, grid * c, nbins).cpu().numpy()
    image = np.einsum("ijb,bpq->ipjq", values, edge_glyphs(nbins, glyph))
    return image.reshape(grid * c * glyph, grid * c * glyph)


def denormalise(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised -> (H, W, 3) in [0, 1]."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def grey_out(image: np.ndarray, masked: torch.Tensor, grid: int) -> np.ndarray:
    """Masked patches drawn grey: (H, W, 3), masked (N,) bool."""
    patch = image.shape[0] // grid
    cover = masked.view(grid, grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1).cpu().numpy()
    return np.where(cover[..., None], 0.5, image)


def save_grid(rows: list[list[np.ndarray]], titles: list[str], path: Path) -> None:
    figure, axes = plt.subplots(len(rows), len(titles), figsize=(2 * len(titles), 2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            axes[r][c].imshow(panel, cmap="gray" if panel.ndim == 2 else None, interpolation="nearest")
            axes[r][c].set_axis_off()
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


@torch.no_grad()
def hog_reconstructions(images, visible, masked, target, prediction, hog, path: Path) -> None:
    """images (B, 3, H, W) normalised; visible/masked (B, N); target (B, N, C); prediction (B, M, C)."""
    grid = math.isqrt(masked.shape[1])
    rows = []
    for i in range(images.shape[0]):
        filled = target[i].clone()
        filled[masked[i]] = prediction[i].float()
        image = denormalise(images[i])
        rows.append([image, grey_out(image, ~visible[i], grid),
                     render_hog(target[i], grid, hog.nbins, hog.cells_per_patch),
                     render_hog(filled, grid, hog.nbins, hog.cells_per_patch)])
    save_grid(rows, ["input", "visible", "HOG target", "HOG predicted (masked)"], path)


@torch.no_grad()
def token_reconstructions(images, visible, masked, target, prediction, path: Path, decoder=None) -> None:
    """target (B, N) token ids; prediction (B, M, V) logits. With a `DiscreteVAE` as `decoder` the tokens
    are decoded to pixels; else masked patches are green where the predicted token is right."""
    grid = math.isqrt(masked.shape[1])
    rows = []
    for i in range(images.shape[0]):
        filled = target[i].clone()
        filled[masked[i]] = prediction[i].argmax(-1)
        image = denormalise(images[i])
        row = [image, grey_out(image, ~visible[i], grid)]
        if decoder is not None:
            for tokens in (target[i], filled):
                codes = torch.nn.functional.one_hot(tokens.view(1, grid, grid), decoder.vocab_size)
                pixels = decoder.decode(codes.permute(0, 3, 1, 2).to(images.device))[0].clamp(0, 1)
                row.append(pixels.permute(1, 2, 0).cpu().numpy())
        else:
            correct = (filled == target[i]).float().view(grid, grid).cpu().numpy()
            shown = np.where(masked[i].view(grid, grid).cpu().numpy(), correct, 0.5)
            row.append(np.stack([1 - shown, shown, np.zeros_like(shown)], -1) * 0.8)
        rows.append(row)
    titles = ["input", "visible"] + (["tokens decoded", "predicted decoded"] if decoder is not None
                                     else ["masked token correct (green)"])
    save_grid(rows, titles, path)
