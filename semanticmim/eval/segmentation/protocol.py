"""What both segmentation protocols share: their data splits and checks, block indices scaled to the
encoder's depth, and training in evaluation intervals through the one training loop.

Training in intervals: the loop has no evaluation hook, so a protocol trains to the end of an interval,
evaluates, and calls the loop again for the next one; each call resumes from the checkpoint the last
one wrote at its final step, with the optimizer and an lr schedule that spans the whole run, so the
weights are those of one uninterrupted run. Evaluations are recorded in `evaluations.json` as they
are made: a killed run resumes training and does not repeat evaluations it already has.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset

from semanticmim.data.layouts import IGNORE_INDEX, SegmentationSplit, available_splits, read_split
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import Plan, RunOptions, Schedule, Task, plan_batches, train
from semanticmim.engine.progress import write_json_atomic
from semanticmim.errors import InputError

__all__ = [
    "Interval",
    "protocol_metrics",
    "read_splits",
    "scaled_blocks",
    "segmentation_loss",
    "settings_fingerprint",
    "summarize",
    "train_in_intervals",
]

PAPER_DEPTH = 12  # ViT-B: block indices in the recipes refer to 12 blocks
SEGMENTATION_FORMATS = ("voc", "ade20k", "pairs")
_TRAIN_SPLITS = ("trainaug", "train", "training")  # VOC trainaug [Table 6], ADE20K training
_VAL_SPLITS = ("val", "validation")


# ------------------------------------------------------------------------------------------- data


def read_splits(
    fmt: str, root: Path, train_split: str | None, val_split: str | None, num_classes: int | None
) -> tuple[SegmentationSplit, SegmentationSplit]:
    """The training and evaluation splits, checked: a segmentation format, neither split empty, both with
    the same classes, and as many classes as the head when `num_classes` is given. None picks the
    conventional split (trainaug/train/training, val/validation) among those on disk."""
    if fmt not in SEGMENTATION_FORMATS:
        raise InputError(f"--format {fmt}: segmentation protocols read one of {', '.join(SEGMENTATION_FORMATS)}")
    on_disk = available_splits(fmt, root)
    train_split = train_split or _first(_TRAIN_SPLITS, on_disk, root, "train_split")
    val_split = val_split or _first(_VAL_SPLITS, on_disk, root, "val_split")
    splits = []
    for name in (train_split, val_split):
        split = read_split(fmt, root, name)
        if not split.samples:
            raise InputError(f"{root}: split {name!r} has no images")
        splits.append(split)
    train_data, val_data = splits
    if train_data.classes != val_data.classes:
        raise InputError(
            f"{root}: splits {train_split!r} and {val_split!r} have different classes "
            f"({len(train_data.classes)} vs {len(val_data.classes)})"
        )
    if num_classes is not None and num_classes != len(train_data.classes):
        raise InputError(f"num_classes={num_classes} but {root} ({fmt}) has {len(train_data.classes)} classes")
    return train_data, val_data


def _first(candidates: tuple[str, ...], on_disk: list[str], root: Path, key: str) -> str:
    found = next((name for name in candidates if name in on_disk), None)
    if found is None:
        raise InputError(f"{root}: none of the splits {list(candidates)} found (splits on disk: {on_disk}); set {key}")
    return found


# ------------------------------------------------------------------------------------- encoders


def scaled_blocks(paper_blocks: Sequence[int], depth: int) -> tuple[int, ...]:
    """The recipe's 1-based blocks of a 12-block ViT-B at the same relative depth of a `depth`-block
    encoder: round(b · depth / 12), at least 1 (block 6 of 12 -> 2 of 4; 4/6/8/12 -> 1/2/3/4)."""
    return tuple(max(1, math.floor(block * depth / PAPER_DEPTH + 0.5)) for block in paper_blocks)


# settings that change how a run executes, not what it computes: changing them keeps its checkpoints
_EXECUTION_ONLY = {
    "num_workers": True,
    "eval_batch_size": True,
    "per_device_batch": True,
    "run": {"checkpoint_every", "keep_checkpoints", "log_every", "compile", "profile", "discard_stale"},
}


def settings_fingerprint(settings: BaseModel, **parts: Any) -> str:
    """What a checkpoint (and a recorded evaluation) must share with a run to be reused by it: the
    settings that define the result, the encoder's hash, the data, the resolved sizes."""
    values = settings.model_dump(mode="json", exclude=_EXECUTION_ONLY)
    text = json.dumps({**parts, "settings": values}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- loss


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, C, h, w), resized bilinearly to the labels (B, H, W), averaged over the
    pixels not labelled 255 (0, not NaN, when a batch has none)."""
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    summed = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / (labels != IGNORE_INDEX).sum().clamp(min=1)


# ---------------------------------------------------------------------------- interval training


@dataclass
class Interval:
    """Train until the loop's epoch `end_epoch` (exclusive end), then evaluate; `label` names the point
    in metrics.json (e.g. {"epoch": 5} or {"step": 16000}); `dataset` is what the loop samples."""

    end_epoch: int
    label: dict
    dataset: Dataset


@dataclass
class TrainingRun:
    """Everything the loop needs besides the interval: `schedule` without its epochs."""

    task: Task
    schedule: Schedule
    options: RunOptions
    env: DistEnv
    out_dir: Path
    run_info: dict
    fingerprint: str
    make_optimizer: Callable[[nn.Module], Any]
    make_lr_schedule: Callable[[Any, Plan], Any]


def train_in_intervals(run: TrainingRun, intervals: list[Interval], evaluate: Callable[[], dict]) -> tuple[dict, list]:
    """Train through `intervals`, evaluating `run.task.model` after each; returns (the loop's metrics of
    the last interval trained here with wall time summed, every evaluation in order)."""
    log_path = run.out_dir / "evaluations.json"
    done = _read_evaluations(log_path, run.fingerprint)
    train_metrics: dict = {}
    seconds = 0.0
    for interval in intervals:
        if any(entry["at"] == interval.label for entry in done):
            continue
        schedule = Schedule(**{**vars(run.schedule), "epochs": interval.end_epoch})
        run.task.model.train()
        train_metrics = train(
            run.task,
            interval.dataset,
            schedule,
            run.options,
            run.env,
            run.out_dir,
            run.run_info,
            run.fingerprint,
            run.make_optimizer,
            run.make_lr_schedule,
        )
        seconds += train_metrics["wall_time_s"]
        expected = plan_batches(schedule, len(interval.dataset), run.env.world_size).total_steps
        if train_metrics["steps"] != expected:
            newest = train_metrics["steps"]
            raise InputError(
                f"{run.out_dir / 'checkpoints'}: the newest checkpoint is at step {newest}, "
                f"past {interval.label} (step {expected}) whose evaluation is not in {log_path.name}; "
                "delete the checkpoints to rerun"
            )
        run.task.model.eval()
        tick = time.perf_counter()
        result = evaluate()
        done.append({"at": interval.label, "eval_seconds": time.perf_counter() - tick, **result})
        if run.env.is_main:
            write_json_atomic(log_path, {"fingerprint": run.fingerprint, "evaluations": done})
            _log_curve(run.out_dir, train_metrics["steps"], result)
    return {**train_metrics, "wall_time_s": seconds}, done


def _read_evaluations(path: Path, fingerprint: str) -> list[dict]:
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    return list(record.get("evaluations", [])) if record.get("fingerprint") == fingerprint else []


def _log_curve(out_dir: Path, step: int, result: dict) -> None:
    from dvclive import Live

    live = Live(str(out_dir / "dvclive"), dvcyaml=False, save_dvc_exp=False, resume=True, report=None)
    live.step = step
    for name in ("miou", "pixel_accuracy"):
        live.log_metric(f"eval/{name}", result[name])
    live.end()


def summarize(evaluations: list[dict]) -> dict:
    """Headline = the last evaluation; the best one is reported apart, labelled as picked on the
    evaluation set itself (an optimistic number, never the headline)."""
    if not evaluations:
        raise InputError("no evaluation was made; is the schedule empty?")
    last = evaluations[-1]
    best = max(evaluations, key=lambda entry: entry["miou"] if math.isfinite(entry["miou"]) else -1.0)
    return {
        "miou": last["miou"],
        "pixel_accuracy": last["pixel_accuracy"],
        "per_class_iou": last["per_class_iou"],
        "classes_scored": last["classes_scored"],
        "chance_miou": last["chance_miou"],
        "evaluated_at": last["at"],
        "best_miou_on_eval_set": {
            "miou": best["miou"],
            "at": best["at"],
            "note": "maximum over the evaluations below, selected on the evaluation set",
        },
        "evaluations": [
            {"at": entry["at"], "miou": entry["miou"], "pixel_accuracy": entry["pixel_accuracy"]}
            for entry in evaluations
        ],
    }


def protocol_metrics(evaluations: list, used: dict, encoder: Any, classes: Any, train: tuple, val: tuple,
                     train_metrics: dict) -> dict:
    """The metrics.json body shared by both protocols: headline/best from `evaluations`, the settings
    used, the encoder's identity, the splits (`(split, dataset)` pairs) and the training summary."""
    (train_split, train_data), (val_split, val_data) = train, val
    return {
        **summarize(evaluations),
        "used": used,
        "encoder": encoder.identity,
        "classes": list(classes),
        "splits": {"train": train_split.name, "val": val_split.name, "train_images": len(train_data),
                   "val_images": len(val_data)},
        "train": {key: train_metrics.get(key) for key in ("final_loss", "steps", "wall_time_s", "img_per_s")},
        "skipped_images": len(train_data.skipped),
    }
