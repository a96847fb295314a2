"""How much of a MIM target a constant predictor already explains: the loss floor a pretraining must beat.

A masked patch's target (MaskFeat's HOG, BEiT's dVAE token) is predicted from context. A predictor that
ignores the image and outputs, for each patch position, the training set's mean HOG (or its token
frequencies) reaches a loss that pretraining must go well below to have learned anything. Usage, in the
project after a `dvc repro` (ImageFolder: ROOT/train/<class>/*, ROOT/val or ROOT/test):

    python scripts/target_floor.py hog data/mini/classification --img-size 32 --patch-size 4 \
        --run runs/pretrain/maskfeat
    python scripts/target_floor.py dvae data/mini/classification --img-size 32 \
        --tokenizer runs/dvae/tokenizer.safetensors --run runs/pretrain/beit

Prints JSON: the losses of the constant predictors on the held-out split (MSE for HOG, cross-entropy in
nats for tokens) and, with --run, the run's final training loss and how far below the best constant it is.
With --neighbours (HOG), also the loss of a linear predictor from the 8 neighbouring patches' HOG on the
interior patches, beside the per-position mean on the same patches: how much of the target the visible
context explains with no learning beyond least squares, at this image and cell size.
The training loss is on augmented crops and masked patches only, so the comparison is approximate.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semanticmim.data.decode import UnreadableImage, load_rgb
from semanticmim.data.layouts import read_imagefolder
from semanticmim.data.transforms import normalize, unit_range
from semanticmim.errors import InputError
from semanticmim.methods.registry import resolve_recipe
from semanticmim.models import MaskGenerator, load_model
from semanticmim.targets import DalleTokenizer, HOGTarget


def hog_constant_losses(train: torch.Tensor, held_out: torch.Tensor) -> dict[str, float]:
    """train (B, N, C), held_out (B', N, C) HOG targets -> MSE of the zero, global-mean and
    per-position-mean predictors on held_out."""
    def mse(prediction: torch.Tensor) -> float:
        return (held_out - prediction).pow(2).mean().item()

    return {"zero": mse(torch.zeros(())), "global_mean": mse(train.mean((0, 1))),
            "per_position_mean": mse(train.mean(0))}


def neighbour_features(residuals: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """residuals (B, grid * grid, C), raster order -> (features (B * M, 8 * C): the 8 neighbours' values of
    each interior patch, targets (B * M, C): its own), M = (grid - 2) ** 2 interior patches."""
    patches = residuals.unflatten(1, (grid, grid))
    inner = slice(1, grid - 1)
    shifted = [patches[:, 1 + dy:grid - 1 + dy, 1 + dx:grid - 1 + dx]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    return torch.cat(shifted, -1).flatten(0, 2), patches[:, inner, inner].flatten(0, 2)


def fit_neighbour_predictor(train: torch.Tensor, held_out: torch.Tensor, mean: torch.Tensor, grid: int,
                            masks: MaskGenerator | None, ridge: float, batch_size: int, seed: int) -> float:
    """Ridge least squares from the 8 neighbours' residuals (a neighbour hidden by `masks` reads as the
    mean) to the interior patch's residual, fit on train -> its MSE on held_out's interior patches."""
    generator = torch.Generator().manual_seed(seed)

    def features(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residuals = (targets - mean).double()
        seen = residuals if masks is None else residuals * masks(len(targets), generator)[0].unsqueeze(2)
        return neighbour_features(seen, grid)[0], neighbour_features(residuals, grid)[1]

    gram = covariance = 0.0
    for i in range(0, len(train), batch_size):
        x, y = features(train[i:i + batch_size])
        gram, covariance = gram + x.T @ x, covariance + x.T @ y
    scale = gram.diagonal().mean()
    weights = torch.linalg.solve(gram + ridge * scale * torch.eye(len(gram), dtype=gram.dtype), covariance)
    x, y = features(held_out)
    return (y - x @ weights).pow(2).mean().item()


def hog_neighbour_losses(train: torch.Tensor, held_out: torch.Tensor, grid: int, mask_ratio: float | None = None,
                         ridge: float = 1e-2, batch_size: int = 500, seed: int = 0) -> dict[str, float]:
    """train (B, N, C), held_out (B', N, C) HOG targets on a grid x grid patch grid -> MSE on held_out's
    interior patches of the per-position mean, and of a linear predictor from the 8 neighbouring patches'
    HOG (ridge least squares on train, the per-position mean subtracted first, one predictor shared by all
    positions): how much of the target the visible context explains linearly. With mask_ratio, also the
    same predictor when patches are hidden as in pretraining."""
    if grid < 3:
        raise InputError(f"a {grid} x {grid} patch grid has no interior patch with 8 neighbours (needs 3 x 3)")
    mean = train.mean(0, keepdim=True)
    interior = neighbour_features((held_out - mean).double(), grid)[1]
    result = {"interior_per_position_mean": interior.pow(2).mean().item(),
              "interior_neighbour_linear": fit_neighbour_predictor(train, held_out, mean, grid, None, ridge,
                                                                   batch_size, seed)}
    if mask_ratio is not None:
        masks = MaskGenerator(grid * grid, mask_ratio)
        result["interior_neighbour_linear_masked"] = fit_neighbour_predictor(train, held_out, mean, grid, masks,
                                                                             ridge, batch_size, seed)
    return result


def position_log_frequencies(train: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """train (B, N) token ids -> (N, V) log of each position's add-one smoothed token frequencies."""
    counts = torch.stack([torch.bincount(train[:, n], minlength=vocab_size) for n in range(train.shape[1])])
    counts = counts.double() + 1
    return (counts / counts.sum(1, keepdim=True)).log()


def token_constant_losses(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """train (B, N), held_out (B', N) token ids -> cross-entropy (nats) of the uniform, global-frequency and
    per-position-frequency predictors on held_out (add-one smoothed frequencies of train)."""
    global_counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1
    global_log_p = (global_counts / global_counts.sum()).log()
    position_log_p = position_log_frequencies(train, vocab_size)
    return {"uniform": math.log(vocab_size),
            "global_frequency": -global_log_p[held_out].mean().item(),
            "per_position_frequency": -position_log_p.gather(1, held_out.T).mean().item()}


def held_out_split(root: Path) -> str:
    for split in ("val", "test"):
        if (root / split).is_dir():
            return split
    raise InputError(f"{root}: no val/ or test/ split beside train/ (the held-out images the floor is measured on)")


def load_pixels(root: Path, split: str, size: int, resample: Image.Resampling) -> torch.Tensor:
    """Every image of ROOT/split, whole, resized to (size, size) -> uint8 (B, 3, size, size)."""
    images = [np.asarray(load_rgb(path).resize((size, size), resample))
              for path, _label in read_imagefolder(root, split).samples]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def batched(function, pixels: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([function(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])


@dataclass
class Targets:
    """A MIM target on an ImageFolder: train (B, N[, C]) and held-out (B', N[, C]) targets, and the held-out
    images as the model sees them, normalised (B', 3, H, W). vocab_size: tokens' vocabulary, None for HOG."""
    train: torch.Tensor
    held_out: torch.Tensor
    held_out_images: torch.Tensor
    vocab_size: int | None = None


def load_targets(kind: str, root: Path, img_size: int, patch_size: int, tokenizer: Path | None) -> Targets:
    split = held_out_split(root)
    images = normalize(load_pixels(root, split, img_size, Image.Resampling.BICUBIC))
    if kind == "hog":
        hog = HOGTarget(9, patch_size // 2, patch_size, patch_size)
        train = batched(lambda p: hog(normalize(p)), load_pixels(root, "train", img_size, Image.Resampling.BICUBIC))
        return Targets(train, batched(hog, images), images)
    if tokenizer is None:
        raise InputError("dvae: --tokenizer is required (the tokenizer.safetensors BEiT predicts)")
    model = DalleTokenizer.load(tokenizer).eval()

    def tokens(split: str) -> torch.Tensor:  # BEiT's tokenizer view: half the model's image, Lanczos-resized
        return batched(lambda p: model(unit_range(p)), load_pixels(root, split, img_size // 2,
                                                                     Image.Resampling.LANCZOS))
    return Targets(tokens("train"), tokens(split), images, model.vocab_size)


def floors(targets: Targets, neighbours: bool = False, mask_ratio: float | None = None) -> dict[str, float]:
    """The constant predictors' held-out losses (and, neighbours: the linear neighbour predictor's, HOG)."""
    if targets.vocab_size is not None:
        if neighbours:
            raise InputError("--neighbours is for hog only (a token's context predictor would be a classifier)")
        return token_constant_losses(targets.train, targets.held_out, targets.vocab_size)
    result = hog_constant_losses(targets.train, targets.held_out)
    if neighbours:
        grid = math.isqrt(targets.train.shape[1])
        result |= hog_neighbour_losses(targets.train, targets.held_out, grid, mask_ratio)
    return result


def run_mask_ratio(record: dict) -> float:
    """The mask ratio a pretraining ran with, from its run.json (stage "pretrain@<variant>", params)."""
    variant = record["stage"].split("@")[-1]
    params = record["params"]
    return resolve_recipe(variant, params["recipe"], params["variants"].get(variant) or {}).mask_ratio


def read_run(run: Path) -> tuple[dict, dict]:
    """A pretraining output folder -> (its metrics.json, its run.json)."""
    found = []
    for name in ("metrics.json", "run.json"):
        if not (run / name).is_file():
            raise InputError(f"{run / name}: not found; --run takes a pretraining output folder "
                             "(runs/pretrain/<variant>)")
        found.append(json.loads((run / name).read_text()))
    return found[0], found[1]


def interior_positions(num_patches: int) -> torch.Tensor:
    """(N,) bool: the patches of a square grid that have 8 neighbours."""
    grid = math.isqrt(num_patches)
    inside = torch.zeros(grid, grid, dtype=torch.bool)
    inside[1:-1, 1:-1] = True
    return inside.flatten()


@torch.no_grad()
def held_out_model_losses(model, targets: Targets, mask_ratio: float, seed: int = 0,
                          batch_size: int = 250) -> dict[str, float]:
    """The pretrained model's loss on the held-out images (whole, no augmentation; masks drawn as in
    pretraining, uniform at `mask_ratio`, from `seed`), beside the per-position constant's on the same
    masked patches, over all masked patches and over the interior ones: MSE for HOG, cross-entropy (nats)
    for tokens."""
    tokens = targets.vocab_size is not None
    constant = (position_log_frequencies(targets.train, targets.vocab_size) if tokens
                else targets.train.mean(0).double())  # (N, V) log-frequencies or (N, C) mean HOG
    num_patches = targets.held_out.shape[1]
    masks = MaskGenerator(num_patches, mask_ratio)
    interior = interior_positions(num_patches)
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros(2, 2, dtype=torch.float64)  # (model, constant) x (all masked, interior masked)
    for i in range(0, len(targets.held_out), batch_size):
        target = targets.held_out[i:i + batch_size]
        visible, masked = masks(len(target), generator)
        prediction = model.head(model.forward_pretrain(targets.held_out_images[i:i + batch_size], visible,
                                                       masked)).double().flatten(0, 1)  # (B * M, V or C)
        chosen = target[masked]  # (B * M,) ids or (B * M, C)
        baseline = constant.expand(len(target), *constant.shape)[masked]
        if tokens:
            losses = torch.stack([torch.nn.functional.cross_entropy(prediction, chosen, reduction="none"),
                                  -baseline.gather(1, chosen.unsqueeze(1)).squeeze(1)])
        else:
            losses = torch.stack([(prediction - chosen).pow(2).mean(1), (baseline - chosen).pow(2).mean(1)])
        inside = interior.expand_as(masked)[masked]
        sums += torch.stack([losses.sum(1), losses[:, inside].sum(1)], 1)
    model_loss, constant_loss = sums[0, 0].item(), sums[1, 0].item()
    return {"held_out_model": model_loss / (len(targets.held_out) * masks.num_masked),
            "held_out_per_position_constant": constant_loss / (len(targets.held_out) * masks.num_masked),
            "held_out_model_below_constant": 1 - model_loss / constant_loss,
            "held_out_model_below_constant_interior": 1 - (sums[0, 1] / sums[1, 1]).item()}


def with_run(result: dict[str, float], run: Path, targets: Targets | None = None) -> dict[str, float]:
    """Adds the run's final training loss, how far below the best constant it is and, given the targets,
    its held-out loss against the per-position constant on the same masked patches."""
    metrics, record = read_run(run)
    final = metrics["final_loss"]
    best_constant = min(value for key, value in result.items() if not key.startswith("interior_"))
    result = {**result, "run_final_loss": final, "below_best_constant": 1 - final / best_constant}
    if targets is not None:
        model = load_model(run / "model.safetensors").eval()
        result |= held_out_model_losses(model, targets, run_mask_ratio(record))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["hog", "dvae"])
    parser.add_argument("data", type=Path, help="an ImageFolder: ROOT/train/<class>/*, ROOT/val or ROOT/test")
    parser.add_argument("--img-size", type=int, required=True, help="the model's input size")
    parser.add_argument("--patch-size", type=int, default=4, help="the model's patch (HOG cells: half of it)")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--run", type=Path, default=None, help="a pretraining output folder to compare with")
    parser.add_argument("--neighbours", action="store_true",
                        help="hog: also a linear predictor from the 8 neighbouring patches' HOG")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        targets = load_targets(args.kind, args.data, args.img_size, args.patch_size, args.tokenizer)
        mask_ratio = run_mask_ratio(read_run(args.run)[1]) if args.run else None
        result = floors(targets, args.neighbours, mask_ratio)
        print(json.dumps(with_run(result, args.run, targets) if args.run else result, indent=1))
    except (InputError, UnreadableImage) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
