"""mIoU from a dataset-level confusion matrix (PascalVOC / ADE20K convention, as in mmseg).

Pixels labelled 255 are ignored. The matrix is summed over the whole evaluation set (and over ranks)
before any ratio is taken, so large and small images weigh by their pixels, not per image.

Absent classes: IoU_c = TP / (TP + FP + FN) is undefined (NaN) for a class that neither occurs in the
ground truth nor is ever predicted; mIoU is the mean over the other classes (mmseg's `nanmean`). A
class that is predicted but never occurs in the ground truth scores 0 and counts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torchmetrics.classification import MulticlassConfusionMatrix

from semanticmim.data.layouts import IGNORE_INDEX
from semanticmim.errors import InputError

__all__ = ["ConfusionMatrix", "iou_per_class", "scores"]


class ConfusionMatrix:
    """Accumulates `matrix[true, predicted]` pixel counts (int64, C x C) with torchmetrics, 255 ignored."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.metric = MulticlassConfusionMatrix(
            num_classes, ignore_index=IGNORE_INDEX, validate_args=False, sync_on_compute=False
        ).to(device)

    def update(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        """predicted, labels: int64 (B, H, W) or (H, W) class ids of the same shape; labels may hold 255.

        A label outside 0..C-1 other than 255 is an InputError: dropping it would silently change the score."""
        labels = labels.reshape(-1).to(predicted.device)
        outside = (labels >= self.num_classes) & (labels != IGNORE_INDEX) | (labels < 0)
        if outside.any():
            value, last = int(labels[outside][0]), self.num_classes - 1
            raise InputError(f"label value {value} outside the head's classes 0..{last} (255 = ignore)")
        self.metric.update(predicted.reshape(-1), labels)

    def compute(self) -> torch.Tensor:
        """The summed matrix (int64, C x C), all-reduced over ranks when torch.distributed is initialised."""
        matrix = self.metric.confmat.clone().long()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(matrix)
        return matrix.cpu()


def iou_per_class(matrix: torch.Tensor) -> torch.Tensor:
    """matrix (C, C) [true, predicted] -> float64 (C,) IoU in [0, 1]; NaN for a class absent from both."""
    matrix = matrix.double()
    true_positive = matrix.diag()
    union = matrix.sum(0) + matrix.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, math.nan))


def scores(matrix: torch.Tensor, classes: tuple[str, ...] | list[str]) -> dict:
    """Everything a metrics.json reports about one evaluation, in percent.

    miou: nanmean of the per-class IoU; pixel_accuracy: correct / labelled pixels; per_class_iou:
    {class: IoU or None (absent)}; chance_miou: the mIoU of predicting the most frequent ground-truth
    class everywhere, the level an encoder that learned nothing should not beat by much.
    """
    iou = iou_per_class(matrix)
    labelled = int(matrix.sum())
    present = iou.isfinite()
    per_class = {
        name: (round(100 * float(value), 4) if math.isfinite(value) else None)
        for name, value in zip(classes, iou.tolist(), strict=True)
    }
    return {
        "miou": 100 * float(iou[present].mean()) if present.any() else math.nan,
        "pixel_accuracy": 100 * float(matrix.diag().sum()) / labelled if labelled else math.nan,
        "per_class_iou": per_class,
        "classes_scored": int(present.sum()),
        "chance_miou": chance_miou(matrix),
        "pixels": labelled,
    }


def chance_miou(matrix: torch.Tensor) -> float:
    """mIoU (percent) of the constant prediction "the most frequent true class": that class scores its
    pixel share, every other class present in the ground truth scores 0."""
    per_class = matrix.sum(1).double()
    total = float(per_class.sum())
    if total == 0:
        return math.nan
    return 100 * float(per_class.max()) / total / int((per_class > 0).sum())
