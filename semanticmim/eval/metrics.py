"""What every evaluation protocol shares: accuracy, per-epoch bookkeeping, and training through the
engine with an evaluation after each epoch.

- `ClassificationAccuracy`: top-1 (and top-5 with more than 5 classes) in percent, via torchmetrics;
  summed over ranks when each rank evaluated a shard of the evaluation split.
- `EpochHistory`: one record of metrics per evaluated epoch, kept in a JSON file so that a resumed
  run keeps the epochs it already evaluated. A protocol's headline is its LAST epoch; the best epoch
  is reported next to it under `best_epoch_*` names: it is picked on the evaluation split itself, so
  it is optimistic and never the headline (DINOv2 picks its grid's best head silently; we do not).
- `train_with_evaluation`: the engine's `train` plus an evaluation every `eval_every` epochs.
- `log_curves`: evaluation curves into the run's dvclive folder, next to the engine's training curves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchmetrics.classification import MulticlassAccuracy

from semanticmim.engine.checkpoint import PREFIX, list_checkpoints
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import Plan, RunOptions, Schedule, Task, plan_batches, train
from semanticmim.engine.progress import write_json_atomic

__all__ = [
    "ClassificationAccuracy",
    "Curves",
    "EpochHistory",
    "evaluation_epochs",
    "log_curves",
    "progress_bar",
    "top_k_names",
    "train_with_evaluation",
]


# --------------------------------------------------------------------------------------- accuracy


def top_k_names(num_classes: int) -> list[str]:
    """The accuracies a classification protocol reports: top-5 only when there are more than 5 classes."""
    return ["top1", "top5"] if num_classes > 5 else ["top1"]


class ClassificationAccuracy:
    """Top-k accuracy in percent over everything `update` saw.

    sync: sum the counts over ranks in `compute` (each rank saw its own shard); leave False when every
    rank evaluates the same samples (cached features), where syncing would only cost time."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", sync: bool = False):
        self.num_classes = num_classes
        self.meters = {name: MulticlassAccuracy(num_classes, top_k=int(name[3:]), average="micro",
                                                sync_on_compute=sync).to(device)
                       for name in top_k_names(num_classes)}

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits: (B, C); labels: (B,) class indices."""
        for meter in self.meters.values():
            meter.update(logits.float(), labels)

    def compute(self) -> dict[str, float]:
        return {name: 100.0 * float(meter.compute()) for name, meter in self.meters.items()}


# ---------------------------------------------------------------------------------- epoch history


@dataclass
class EpochHistory:
    """Evaluation results per epoch (1-based), persisted at `path` (rank 0 writes, every rank keeps them).

    `fingerprint` ties the file to one run's settings: a file written with other settings is ignored
    (and replaced by the first new record)."""

    path: Path | None = None
    fingerprint: str = ""
    records: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> EpochHistory:
        history = cls(path, fingerprint)
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("fingerprint") == fingerprint:
                history.records = list(saved.get("epochs", []))
        return history

    @property
    def epochs(self) -> list[int]:
        return [int(record["epoch"]) for record in self.records]

    def record(self, epoch: int, values: dict[str, float], write: bool = True) -> None:
        """Store the metrics of `epoch` (replacing an earlier record of it) and, if `write`, save the file."""
        self.records = sorted([r for r in self.records if r["epoch"] != epoch] + [{"epoch": epoch, **values}],
                              key=lambda r: r["epoch"])
        if write and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"fingerprint": self.fingerprint, "epochs": self.records})

    def last(self) -> dict[str, float]:
        if not self.records:
            raise ValueError("no epoch was evaluated")
        return self.records[-1]

    def best(self, key: str, higher_is_better: bool = True) -> dict[str, float]:
        """The record with the best `key` (the earliest one on ties)."""
        sign = 1.0 if higher_is_better else -1.0
        return max(self.records, key=lambda r: (sign * r[key], -r["epoch"]))

    def summary(self, prefix: str, names: Sequence[str], select: str, suffix: str = "",
                higher_is_better: bool = True) -> dict[str, float | int]:
        """Headline and best epoch of the metrics `prefix + name`:

        `{name}{suffix}` = the LAST epoch's value (the headline); `best_epoch_{name}{suffix}` = the value
        at the epoch where `prefix + select` was best; `best_epoch{suffix}` = that epoch's number.
        E.g. summary("head/", ["top1", "top5"], "top1") -> top1, top5, best_epoch_top1, best_epoch_top5,
        best_epoch."""
        last, best = self.last(), self.best(prefix + select, higher_is_better)
        out: dict[str, float | int] = {f"{name}{suffix}": last[prefix + name] for name in names}
        out.update({f"best_epoch_{name}{suffix}": best[prefix + name] for name in names})
        out[f"best_epoch{suffix}"] = int(best["epoch"])
        return out


# ------------------------------------------------------------------------------- training + eval


def evaluation_epochs(epochs: int, eval_every: int) -> list[int]:
    """The epochs after which a protocol evaluates: every `eval_every`-th, and always the last."""
    return sorted({*range(eval_every, epochs, eval_every), epochs})


def checkpointed_step(out_dir: Path) -> int:
    """The step of the newest complete checkpoint in `out_dir/checkpoints` (0 when there is none)."""
    checkpoints = list_checkpoints(out_dir / "checkpoints")
    return int(checkpoints[-1].name[len(PREFIX):]) if checkpoints else 0


def train_with_evaluation(
    task: Task,
    dataset: Any,
    schedule: Schedule,
    options: RunOptions,
    env: DistEnv,
    out_dir: Path,
    history: EpochHistory,
    evaluate: Callable[[], dict[str, float]],
    settings: str,
    make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    make_lr_schedule: Callable[[torch.optim.Optimizer, Plan], Any],
    run_info: dict | None = None,
    eval_every: int = 1,
) -> dict:
    """Train `task.model` with the engine for `schedule.epochs`, calling `evaluate()` (which must put the
    model in eval mode and back) after each evaluation epoch and recording its result in `history`.

    The engine has no per-epoch hook, so it is called once per evaluation interval with `epochs` set to
    the interval's end: each call resumes from the checkpoint the previous one wrote at its last step,
    and the lr schedule is made for the whole run (`make_lr_schedule(optimizer, plan)` receives the
    whole run's plan) and follows the global step, so the weights are those of one uninterrupted run.
    A killed run resumes where it stopped; intervals already trained and evaluated are skipped.
    Returns the engine's metrics of the last interval trained, with the total wall time.
    """
    plan = plan_batches(schedule, len(dataset), env.world_size)
    metrics: dict = {}
    wall_time = 0.0
    for end in evaluation_epochs(schedule.epochs, eval_every):
        if end in history.epochs and checkpointed_step(out_dir) >= end * plan.steps_per_epoch:
            continue
        metrics = train(task, dataset, replace(schedule, epochs=end), options, env, out_dir, run_info, settings,
                        make_optimizer, lambda optimizer, _interval: make_lr_schedule(optimizer, plan))
        wall_time += metrics["wall_time_s"]
        # a checkpoint past `end` (e.g. written with a larger eval_every) holds later weights: not evaluable
        if end not in history.epochs and metrics["steps"] == end * plan.steps_per_epoch:
            values = evaluate()
            history.record(end, values, write=env.is_main)
            if env.is_main:
                log_curves(out_dir / "dvclive", end * plan.steps_per_epoch, values)
    return {**metrics, "wall_time_s": wall_time, "steps": schedule.epochs * plan.steps_per_epoch}


class Curves:
    """dvclive curves of a run (rank 0 only: inactive elsewhere). `resume` keeps what the folder holds
    (the engine's training curves, earlier epochs); otherwise it starts afresh."""

    def __init__(self, directory: Path, active: bool = True, resume: bool = True):
        self.live = None
        if active:
            from dvclive import Live

            self.live = Live(str(directory), dvcyaml=False, save_dvc_exp=False, resume=resume, report=None)

    def log(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.live is not None:
            self.live.step = step
            for name, value in values.items():
                self.live.log_metric(f"{prefix}{name}", value)

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
            self.live = None


def log_curves(directory: Path, step: int, values: dict[str, float], prefix: str = "eval/") -> None:
    """Append `values` at `step` to the dvclive run in `directory`, keeping what is there."""
    curves = Curves(directory)
    curves.log(step, values, prefix)
    curves.close()


def progress_bar(description: str, active: bool) -> Progress:
    """A transient rich progress bar on stderr (disabled unless `active`: rank 0 and not quiet)."""
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not active)
