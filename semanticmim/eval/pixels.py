"""The raw-pixel floor of Table 1's classification columns: the linear probe's head and recipe on the
image's normalised pixels instead of an encoder's features, so a reader knows what a probe accuracy is
worth (a pretrained encoder below it has learned nothing a linear classifier could not read off the
pixels).

Features: resize + centre crop to `img_size` (the probe's evaluation transform), ImageNet-normalised,
flattened (3·S² values), through a parameter-free LayerNorm like the probe's features; head: Linear,
init N(0, 0.01); AdamW on the weights' decay only, per-step cosine, lr stated at `lr_batch` and scaled
linearly. Trained by the engine's loop over the cached pixel features.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from semanticmim.data.layouts import ClassificationDataset, SkipLog
from semanticmim.data.transforms import ClassifierEval, normalize
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import Evaluation, RunOptions, to_device, train
from semanticmim.engine.optim import build_schedule
from semanticmim.engine.recipe import Recipe
from semanticmim.eval.metrics import fingerprint, protocol_result
from semanticmim.eval.splits import read_splits
from semanticmim.settings import Strict

LAYER_NORM_EPS = 1e-6


class Settings(Strict):
    """The floor's recipe: the linear probe's (Table 5) on pixels at `img_size`."""

    # the params section these values come from: validation errors name `eval.linear_cls.<key>`
    model_config = ConfigDict(title="eval.linear_cls")

    img_size: PositiveInt = 32  # pixels per side: 3·S² features (32 -> 3072)
    epochs: PositiveInt = 100
    batch_size: PositiveInt = 1024
    lr: PositiveFloat = 4e-3
    lr_batch: PositiveInt = 1024
    weight_decay: NonNegativeFloat = 1e-4
    eval_every: PositiveInt = 10
    num_workers: NonNegativeInt = 2
    train_split: str = "train"
    val_split: str = "val"
    run: RunOptions = RunOptions()


@torch.no_grad()
def pixel_features(split, img_size: int, num_workers: int,
                   skip_report: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A classification split -> features (N, 3·S²) float32 (normalised, LayerNorm'ed), labels (N,).
    Unreadable images are skipped and listed in `skip_report` (JSON lines)."""
    dataset = ClassificationDataset(split, ClassifierEval(img_size), skip_report=skip_report, lazy_decode=True)
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers)
    features, labels = [], []
    for images, targets in loader:
        flat = normalize(images).flatten(1)
        features.append(F.layer_norm(flat, flat.shape[-1:], eps=LAYER_NORM_EPS))
        labels.append(targets.long())
    return torch.cat(features), torch.cat(labels)


@dataclass
class PixelProbe:
    """The engine's task: cross-entropy of a Linear head on pixel-feature rows."""

    model: nn.Linear
    name: str = "raw-pixel-probe"

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        features, labels = to_device(batch, self.model.weight.device)
        return F.cross_entropy(module(features).float(), labels)

    def to(self, device: torch.device) -> PixelProbe:
        return self


@torch.no_grad()
def accuracy(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    was_training = head.training
    head.eval()
    device = head.weight.device
    correct = sum(int((head(f.to(device)).argmax(1) == y.to(device)).sum())
                  for f, y in zip(features.split(4096), labels.split(4096), strict=True))
    head.train(was_training)
    return {"top1": 100.0 * correct / len(labels)}


def evaluate(data_root: Path, layout: str, settings: Settings, out_dir: Path, env: DistEnv,
             quiet: bool) -> dict:
    """Train and evaluate the floor; -> {"metrics": {top1, best_epoch_top1, best_epoch}, "run": {...}}."""
    train_split, val_split = read_splits("classification", layout, data_root, settings.train_split,
                                         settings.val_split, None, "eval.linear_cls")
    skipped = Path(out_dir) / "skipped.jsonl"
    train_x, train_y = pixel_features(train_split, settings.img_size, settings.num_workers, skipped)
    val_x, val_y = pixel_features(val_split, settings.img_size, settings.num_workers, skipped)
    torch.manual_seed(settings.run.seed)
    head = nn.Linear(train_x.shape[1], len(train_split.classes))
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    head.to(env.device)
    recipe = Recipe(epochs=settings.epochs, batch_size=min(settings.batch_size, len(train_x)), lr=settings.lr,
                    lr_batch=settings.lr_batch,
                    min_lr=0.0, warmup_epochs=0.0, weight_decay=settings.weight_decay, clip_grad=None)
    schedule, _plan = recipe.plan(len(train_x), 1)

    def optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": [model.weight], "weight_decay": settings.weight_decay},
                                  {"params": [model.bias], "weight_decay": 0.0}], lr=schedule.lr)

    options = replace(settings.run, num_workers=0, quiet=quiet)
    identity = fingerprint(settings, data=str(Path(data_root).resolve()), format=layout, floor="raw-pixels")
    metrics = train(PixelProbe(head), TensorDataset(train_x, train_y), schedule, options, env, out_dir,
                    fingerprint=identity, make_optimizer=optimizer,
                    make_lr_schedule=lambda o, plan: build_schedule(o, plan.total_steps, 0, 0.0),
                    evaluate=Evaluation(lambda _epoch: accuracy(head, val_x, val_y), settings.eval_every))
    numbers = metrics["history"].summary("", ["top1"], "top1")
    details = {"features": int(train_x.shape[1]), "train_images": len(train_x), "val_images": len(val_x),
               "classes": len(train_split.classes), "lr_scaled": schedule.lr, "global_batch": schedule.effective_batch,
               "skipped_images": len(SkipLog(skipped).entries())}
    return protocol_result(numbers, details, ["top1"])
