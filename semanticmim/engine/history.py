"""Evaluations made during a run, persisted so that a resumed run keeps the ones it already made.

A record is `{unit: at, **metrics}` with `unit` "epoch" (1-based, after that epoch) or "step" (after that
optimizer step). A run's headline is its LAST evaluation; the best one is reported next to it under
`best_*` names: it is picked on the evaluation split itself, so it is optimistic and never the headline
(DINOv2 picks its grid's best head silently; we do not).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from semanticmim.engine.progress import write_json_atomic

Unit = Literal["epoch", "step"]


@dataclass
class History:
    """Evaluation records, persisted at `path` (rank 0 writes, every rank keeps them). `fingerprint` ties
    the file to one run's settings: a file written with other settings is ignored (and replaced)."""

    path: Path | None = None
    fingerprint: str = ""
    unit: Unit = "epoch"
    records: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, fingerprint: str, unit: Unit = "epoch") -> History:
        history = cls(path, fingerprint, unit)
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("fingerprint") == fingerprint and saved.get("unit", "epoch") == unit:
                history.records = list(saved.get("records", saved.get("epochs", [])))
        return history

    @property
    def points(self) -> list[int]:
        """The epochs (or steps) evaluated so far."""
        return [int(record[self.unit]) for record in self.records]

    def record(self, at: int, values: dict[str, float], write: bool = True) -> None:
        """Store the metrics at `at` (replacing an earlier record of it) and, if `write`, save the file."""
        self.records = sorted([r for r in self.records if r[self.unit] != at] + [{self.unit: at, **values}],
                              key=lambda r: r[self.unit])
        if write and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"fingerprint": self.fingerprint, "unit": self.unit,
                                          "records": self.records})

    def last(self) -> dict[str, float]:
        if not self.records:
            raise ValueError("nothing was evaluated")
        return self.records[-1]

    def best(self, key: str, higher_is_better: bool = True) -> dict[str, float]:
        """The record with the best `key` (the earliest one on ties)."""
        sign = 1.0 if higher_is_better else -1.0
        return max(self.records, key=lambda r: (sign * r[key], -r[self.unit]))

    def summary(self, prefix: str, names: Sequence[str], select: str, suffix: str = "",
                higher_is_better: bool = True) -> dict[str, float | int]:
        """Headline and best evaluation of the metrics `prefix + name`:

        `{name}{suffix}` = the LAST evaluation's value (the headline); `best_{unit}_{name}{suffix}` = the
        value where `prefix + select` was best; `best_{unit}{suffix}` = that epoch's (step's) number. E.g.
        summary("head/", ["top1", "top5"], "top1") -> top1, top5, best_epoch_top1, best_epoch_top5, best_epoch."""
        last, best = self.last(), self.best(prefix + select, higher_is_better)
        out: dict[str, float | int] = {f"{name}{suffix}": last[prefix + name] for name in names}
        out.update({f"best_{self.unit}_{name}{suffix}": best[prefix + name] for name in names})
        out[f"best_{self.unit}{suffix}"] = int(best[self.unit])
        return out


def evaluation_points(total: int, every: int) -> list[int]:
    """The epochs (or steps) after which a run evaluates: every `every`-th, and always the last."""
    return sorted({*range(every, total, every), total})
