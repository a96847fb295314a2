"""What every evaluation protocol shares: accuracy, the checkpoint fingerprint, where each setting's
value comes from, and the shape of a protocol's result.

Every protocol trains through the engine's one loop (`semanticmim.engine.loop.train` with an
`Evaluation` hook); the engine's `History` keeps the evaluations (`OUT/history.json`) and its
`summary` gives the headline — the LAST evaluation — and the best one under `best_{epoch|step}_*`
names (picked on the evaluation split itself: optimistic, a diagnostic, never the headline).

A protocol's `evaluate(...)` returns `{"metrics": ..., "run": ...}` (see `protocol_result`):
`metrics` holds numbers only — what `metrics.json` and `dvc metrics show/diff` carry — and `run`
everything else (resolved settings with their sources, the encoder's identity, grid diagnostics,
per-class scores, notes, timing), which the stage writes to `run.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchmetrics.classification import MulticlassAccuracy

__all__ = [
    "EXECUTION_ONLY",
    "ClassificationAccuracy",
    "fingerprint",
    "progress_bar",
    "protocol_result",
    "top_k_names",
    "value_sources",
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


# ------------------------------------------------------------------------------------ fingerprint

# settings that change how a run executes, not what it computes: changing them keeps its checkpoints
EXECUTION_ONLY = frozenset({"num_workers", "eval_every", "eval_interval", "eval_batch_size", "batch_per_device",
                            "per_device_batch"})
RUN_EXECUTION_ONLY = frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "compile", "profile",
                                "discard_stale", "num_workers", "quiet"})


def fingerprint(settings: BaseModel, **identity: Any) -> str:
    """What a checkpoint, a history or a feature cache must share with a run to be reused by it: the
    settings that define the result (not `EXECUTION_ONLY` ones, nor the run's logging/checkpointing)
    and `identity` (the encoder's hash, the data, the head, resolved sizes...). 16 hex digits."""
    values = settings.model_dump(mode="json", exclude=set(EXECUTION_ONLY & set(type(settings).model_fields)))
    if isinstance(values.get("run"), dict):
        values["run"] = {key: value for key, value in values["run"].items() if key not in RUN_EXECUTION_ONLY}
    text = json.dumps({"settings": values, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def value_sources(settings: BaseModel, sources: Mapping[str, str], preset: Mapping[str, Any] | None = None,
                  preset_source: str = "") -> dict[str, str]:
    """Where each setting's value comes from: `preset_source` where a preset set it, "params" where the
    params file set it, else the default's source (`sources`: "paper Table 6", "authors' code", "ours"...)."""
    preset, given, out = preset or {}, settings.model_fields_set, {}
    for key, source in sources.items():
        if key in preset and _same(getattr(settings, key), preset[key]):
            out[key] = preset_source
        else:
            out[key] = "params" if key in given else source
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, default=str) == json.dumps(b, default=str)


# ---------------------------------------------------------------------------------------- results


def protocol_result(metrics: dict[str, Any], run: dict[str, Any], headline: Sequence[str]) -> dict[str, dict]:
    """`{"metrics": numbers, "run": details}`, the return value of every protocol's `evaluate()`.

    metrics: numbers only (int or float, NaN allowed), flat or nested one level (dvc shows `a.b`);
    run: everything else, JSON-able; `run["headline"]` = the headline numbers by their dotted names
    in `metrics` (what the CLI prints). A non-number in `metrics` is a programming error (TypeError)."""
    check_numbers(metrics)
    return {"metrics": metrics, "run": {"headline": {name: _lookup(metrics, name) for name in headline}, **run}}


def check_numbers(metrics: Mapping[str, Any], depth: int = 0) -> None:
    for key, value in metrics.items():
        if isinstance(value, Mapping) and depth == 0:
            check_numbers(value, depth + 1)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"metrics[{key!r}] = {value!r}: metrics hold numbers only (details go to run.json)")


def _lookup(metrics: Mapping[str, Any], dotted: str) -> float:
    value: Any = metrics
    for part in dotted.split("."):
        value = value[part]
    return value


def finite_or_none(value: float) -> float | None:
    """NaN (an absent class's IoU) as JSON null in run.json."""
    return value if math.isfinite(value) else None


def progress_bar(description: str, active: bool) -> Progress:
    """A transient rich progress bar on stderr (disabled unless `active`: rank 0 and not quiet)."""
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True, disable=not active)
