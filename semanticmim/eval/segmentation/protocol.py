"""What both segmentation protocols share: block indices scaled to the encoder's depth, the loss, the
views normalised with the encoder's own mean/std, and the evaluation record and result.

Both train through the engine's one loop with an `Evaluation` hook (linear: every `eval_every` epochs;
UperNet: every `eval_interval` steps), so evaluations live in the engine's `History` (`OUT/history.json`):
one record per evaluation with `miou`, `pixel_accuracy`, `chance_miou`, `classes_scored` and each
class's IoU as `iou/<class index>` (NaN when the class is absent), kept across resumes, never repeated.

Result (`protocol_result`): metrics = `miou`, `pixel_accuracy`, `chance_miou` of the LAST evaluation
(the headline), `best_{epoch|step}_miou`, `best_{epoch|step}_pixel_accuracy` and `best_{epoch|step}`
(the best evaluation, picked on the evaluation set itself: optimistic, a diagnostic); run = per-class
IoU by class name, every evaluation, classes, splits, settings used and their sources, the encoder's
identity, the training summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from semanticmim.data.layouts import IGNORE_INDEX
from semanticmim.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from semanticmim.engine.history import History
from semanticmim.eval.encoder import Encoder, Normalization
from semanticmim.eval.metrics import finite_or_none, protocol_result

__all__ = [
    "EncoderNormalized",
    "evaluation_record",
    "scaled_blocks",
    "segmentation_loss",
    "segmentation_result",
]

PAPER_DEPTH = 12  # ViT-B: block indices in the recipes refer to 12 blocks
SUMMARISED = ("miou", "pixel_accuracy")


def scaled_blocks(paper_blocks: Sequence[int], depth: int) -> tuple[int, ...]:
    """The recipe's 1-based blocks of a 12-block ViT-B at the same relative depth of a `depth`-block
    encoder: round(b · depth / 12), at least 1 (block 6 of 12 -> 2 of 4; 4/6/8/12 -> 1/2/3/4)."""
    return tuple(max(1, math.floor(block * depth / PAPER_DEPTH + 0.5)) for block in paper_blocks)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, C, h, w), resized bilinearly to the labels (B, H, W), averaged over the
    pixels not labelled 255 (0, not NaN, when a batch has none)."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    summed = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / (labels != IGNORE_INDEX).sum().clamp(min=1)


# ------------------------------------------------------------------------------ encoder's mean/std


class EncoderNormalized:
    """A segmentation view of `semanticmim.data.transforms` (it normalises in the data worker, with
    ImageNet's mean/std) re-normalised to the encoder's own: x' = x·std_in/std + (mean_in − mean)/std per
    channel, exact but for float rounding. Only made for encoders with other constants (`wrap`): for
    ImageNet's the view is used as it is, bitwise. ADE20K's padding (0 after ImageNet's normalisation,
    i.e. ImageNet's mean colour) stays ImageNet's mean colour."""

    def __init__(self, view: Callable, normalization: Normalization):
        self.view = view
        std_in, mean_in = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std, mean = torch.tensor(normalization.std).view(3, 1, 1), torch.tensor(normalization.mean).view(3, 1, 1)
        self.scale, self.shift = std_in / std, (mean_in - mean) / std

    @classmethod
    def wrap(cls, view: Callable, encoder: Encoder) -> Callable:
        normalization = encoder.normalization
        return view if normalization.is_imagenet else cls(view, normalization)

    def __call__(self, image, label) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, label = self.view(image, label)
        return pixels * self.scale + self.shift, label


# ---------------------------------------------------------------------------------------- results


def evaluation_record(scores: dict) -> dict[str, float]:
    """`miou.scores(...)` -> the flat numbers one History record keeps (and dvclive logs as `eval/*`)."""
    record = {name: float(scores[name]) for name in ("miou", "pixel_accuracy", "chance_miou", "classes_scored")}
    for index, value in enumerate(scores["per_class_iou"].values()):
        record[f"iou/{index}"] = math.nan if value is None else float(value)
    return record


def training_details(encoder, train_split, val_split, train_data, val_data, trained: dict, plan) -> dict[str, Any]:
    """What both segmentation protocols record of a training run beside their settings: the encoder's
    identity, the splits, the loop's numbers, the batch plan and the images skipped."""
    return {
        "encoder": encoder.identity,
        "splits": {"train": train_split.name, "val": val_split.name, "train_images": len(train_data),
                   "val_images": len(val_data)},
        "train": {key: trained.get(key) for key in ("final_loss", "steps", "wall_time_s", "img_per_s")},
        "batch_plan": vars(plan),
        "skipped_images": len(train_data.skipped),
    }


def segmentation_result(history: History, classes: Sequence[str], run: dict[str, Any]) -> dict[str, dict]:
    """The protocol's `{"metrics", "run"}` from its evaluations (see the module docstring)."""
    last, unit = history.last(), history.unit
    summary = history.summary("", SUMMARISED, "miou")  # the headline's names and best_{unit}_*
    metrics = {**summary, "chance_miou": last["chance_miou"]}
    details = {
        "evaluated_at": {unit: int(last[unit])},
        "per_class_iou": {name: finite_or_none(last[f"iou/{index}"]) for index, name in enumerate(classes)},
        "classes_scored": int(last["classes_scored"]),
        "evaluations": [{unit: int(r[unit]), **{name: r[name] for name in SUMMARISED}} for r in history.records],
        "classes": list(classes),
        "notes": {"headline": f"miou/pixel_accuracy/chance_miou: the last evaluation; best_{unit}_*: the best "
                              "evaluation, picked on the evaluation set itself (optimistic, a diagnostic)"},
    }
    return protocol_result(metrics, {**details, **run}, headline=["miou"])
