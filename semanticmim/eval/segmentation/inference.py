"""From logits to a score: whole-image and sliding-window inference (mmseg's `whole` / `slide` test modes)
and the evaluation pass that fills a dataset-level confusion matrix, in eval mode, on every rank's share.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset, Subset

from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import autocast_for
from semanticmim.eval.segmentation.miou import ConfusionMatrix, scores

__all__ = ["Predictor", "evaluate_dataset", "slide_inference", "whole_inference", "window_starts"]

Predictor = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, h, w) -> logits (B, C, h', w'), any stride


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False, as mmseg) in float32."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def whole_inference(predict: Predictor, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) -> logits (B, C, H, W): one forward pass, logits resized to the input."""
    return resize_logits(predict(images), images.shape[-2:])


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """mmseg's slide grid along one axis: ceil((length - crop) / stride) + 1 windows, the last one flush with
    the border (a window start is moved back so that no window hangs over the edge)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride + crop, length) - crop, 0) for i in range(count)})


def slide_inference(
    predict: Predictor, images: torch.Tensor, crop: int, stride: int, windows_per_batch: int = 8
) -> torch.Tensor:
    """images (B, 3, H, W) -> logits (B, C, H, W): crop x crop windows every `stride` pixels, each window's
    logits resized to the window, overlapping windows averaged (mmseg `slide`). A side shorter than the crop
    is padded with 0 (the normalised mean, as training pads) and the padding's logits are dropped."""
    height, width = images.shape[-2:]
    boxes = [(top, left) for top in window_starts(height, crop, stride) for left in window_starts(width, crop, stride)]
    total, count = None, images.new_zeros((1, 1, height, width))
    for first in range(0, len(boxes), windows_per_batch):
        group = boxes[first : first + windows_per_batch]
        crops = torch.cat([_window(images, top, left, crop) for top, left in group])
        logits = whole_inference(predict, crops).split(images.shape[0])
        for (top, left), window_logits in zip(group, logits, strict=True):
            h, w = min(crop, height - top), min(crop, width - left)
            if total is None:
                total = window_logits.new_zeros((images.shape[0], window_logits.shape[1], height, width))
            total[:, :, top : top + h, left : left + w] += window_logits[:, :, :h, :w]
            count[:, :, top : top + h, left : left + w] += 1
    return total / count


def _window(images: torch.Tensor, top: int, left: int, crop: int) -> torch.Tensor:
    window = images[:, :, top : top + crop, left : left + crop]
    pad_h, pad_w = crop - window.shape[-2], crop - window.shape[-1]
    return F.pad(window, (0, pad_w, 0, pad_h)) if pad_h or pad_w else window


@torch.no_grad()
def evaluate_dataset(
    infer: Predictor,
    dataset: Dataset,
    classes: tuple[str, ...],
    env: DistEnv,
    batch_size: int,
    num_workers: int,
    amp: str = "auto",
    quiet: bool = False,
) -> dict:
    """Scores of `infer` on `dataset` (yielding (image (3, h, w), label (H, W))): logits are resized to
    the label's size (bilinear), argmax'd and counted; each rank takes every world_size-th image and
    the confusion matrices are summed. The caller puts its model in eval mode."""
    shard = Subset(dataset, range(env.rank, len(dataset), env.world_size))  # type: ignore[arg-type]
    loader = DataLoader(
        shard, batch_size=batch_size, num_workers=num_workers, shuffle=False, pin_memory=env.device.type == "cuda"
    )
    matrix = ConfusionMatrix(len(classes), env.device)
    with _progress(env.is_main and not quiet, len(loader)) as advance:
        for images, labels in loader:
            images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            with autocast_for(env.device, amp):
                logits = infer(images)
            matrix.update(resize_logits(logits, labels.shape[-2:]).argmax(1), labels)
            advance()
    return scores(matrix.compute(), classes)


class _progress:
    """A transient rich bar for the evaluation pass (rank 0, not quiet); yields `advance()`."""

    def __init__(self, active: bool, total: int):
        self.bar = (
            Progress(
                TextColumn("evaluate"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            if active
            else None
        )
        self.total = total

    def __enter__(self) -> Callable[[], None]:
        if self.bar is None:
            return lambda: None
        self.bar.start()
        task = self.bar.add_task("evaluate", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
