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
The training loss is on augmented crops and masked patches only, so the comparison is approximate.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from semanticmim.data.decode import UnreadableImage, load_rgb
from semanticmim.data.layouts import read_imagefolder
from semanticmim.data.transforms import normalize, unit_range
from semanticmim.errors import InputError
from semanticmim.targets import DalleTokenizer, HOGTarget


def hog_constant_losses(train: torch.Tensor, held_out: torch.Tensor) -> dict[str, float]:
    """train (B, N, C), held_out (B', N, C) HOG targets -> MSE of the zero, global-mean and
    per-position-mean predictors on held_out."""
    def mse(prediction: torch.Tensor) -> float:
        return (held_out - prediction).pow(2).mean().item()

    return {"zero": mse(torch.zeros(())), "global_mean": mse(train.mean((0, 1))),
            "per_position_mean": mse(train.mean(0))}


def token_constant_losses(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """train (B, N), held_out (B', N) token ids -> cross-entropy (nats) of the uniform, global-frequency and
    per-position-frequency predictors on held_out (add-one smoothed frequencies of train)."""
    positions = train.shape[1]
    global_counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1
    per_position = torch.stack([torch.bincount(train[:, n], minlength=vocab_size) for n in range(positions)])
    per_position = per_position.double() + 1
    global_log_p = (global_counts / global_counts.sum()).log()
    position_log_p = (per_position / per_position.sum(1, keepdim=True)).log()
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


def targets_of(root: Path, target, size: int, resample: Image.Resampling) -> tuple[torch.Tensor, torch.Tensor]:
    """target: uint8 (B, 3, size, size) -> targets; -> (train targets, held-out targets)."""
    held_out = held_out_split(root)
    return tuple(batched(target, load_pixels(root, split, size, resample)) for split in ("train", held_out))


def floors(kind: str, root: Path, img_size: int, patch_size: int, tokenizer: Path | None) -> dict[str, float]:
    if kind == "hog":
        hog = HOGTarget(9, patch_size // 2, patch_size, patch_size)
        train, held_out = targets_of(root, lambda p: hog(normalize(p)), img_size, Image.Resampling.BICUBIC)
        return hog_constant_losses(train, held_out)
    if tokenizer is None:
        raise InputError("dvae: --tokenizer is required (the tokenizer.safetensors BEiT predicts)")
    model = DalleTokenizer.load(tokenizer).eval()
    # BEiT's tokenizer view: half the model's image, Lanczos-resized
    train, held_out = targets_of(root, lambda p: model(unit_range(p)), img_size // 2, Image.Resampling.LANCZOS)
    return token_constant_losses(train, held_out, model.vocab_size)


def with_run(result: dict[str, float], run: Path) -> dict[str, float]:
    metrics = run / "metrics.json"
    if not metrics.is_file():
        raise InputError(f"{metrics}: not found; --run takes a pretraining output folder (runs/pretrain/<variant>)")
    final = json.loads(metrics.read_text())["final_loss"]
    best_constant = min(result.values())
    return {**result, "run_final_loss": final, "below_best_constant": 1 - final / best_constant}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["hog", "dvae"])
    parser.add_argument("data", type=Path, help="an ImageFolder: ROOT/train/<class>/*, ROOT/val or ROOT/test")
    parser.add_argument("--img-size", type=int, required=True, help="the model's input size")
    parser.add_argument("--patch-size", type=int, default=4, help="the model's patch (HOG cells: half of it)")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--run", type=Path, default=None, help="a pretraining output folder to compare with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        result = floors(args.kind, args.data, args.img_size, args.patch_size, args.tokenizer)
        print(json.dumps(with_run(result, args.run) if args.run else result, indent=1))
    except (InputError, UnreadableImage) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
