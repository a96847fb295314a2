"""What a run shows and records: a rich progress bar per epoch, a one-line summary per epoch,
dvclive curves (`dvcyaml=False`; dvc.yaml declares them) and `metrics.json`. Rank 0 only."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Reporter:
    def __init__(self, out_dir: Path, active: bool, quiet: bool, run_info: dict | None, plan: Any) -> None:
        self.out_dir, self.active, self.quiet = out_dir, active, quiet
        self.console = Console(stderr=True)
        self.progress: Progress | None = None
        self.live = None
        self.window: list[float] = []
        if not active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if run_info is not None:
            write_json_atomic(out_dir / "run.json", {**run_info, "batch_plan": vars(plan)})
        for note in plan.notes:
            self.warn(note)

    def open_live(self, resumed: bool) -> None:
        if not self.active:
            return
        from dvclive import Live

        self.live = Live(str(self.out_dir / "dvclive"), dvcyaml=False, save_dvc_exp=False, resume=resumed,
                         report=None)

    def warn(self, message: str) -> None:
        if self.active:
            self.console.print(f"[yellow]warning:[/] {message}", highlight=False)

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.window = []
        if not self.active or self.quiet:
            return
        self.progress = Progress(TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=self.console,
                                 transient=True)
        self.progress.start()
        self.bar = self.progress.add_task("train", total=steps, completed=done, status="")

    def log_step(self, step: int, loss: float, lr: float, grad_norm: float, img_per_s: float, every: int) -> None:
        if not self.active:
            return
        self.window.append(img_per_s)
        if self.progress is not None:
            self.progress.update(self.bar, advance=1,
                                 status=f"loss {loss:.4f} lr {lr:.2e} {img_per_s:.0f} img/s")
        if step % every == 0 and self.live is not None:
            self.live.step = step
            for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm), ("img_per_s", img_per_s)):
                self.live.log_metric(f"train/{name}", value if math.isfinite(value) else 0.0)

    def log_values(self, step: int, values: dict[str, float], prefix: str) -> None:
        """Curves other than the training step's (e.g. `eval/top1`) at `step`."""
        if self.live is None:
            return
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(f"{prefix}{name}", value)

    def end_epoch(self, epoch: int, loss: float) -> None:
        if not self.active:
            return
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        speed = sum(self.window) / len(self.window) if self.window else 0.0
        self.console.print(f"epoch {epoch + 1}: loss {loss:.4f}, {speed:.0f} img/s", highlight=False)

    def close(self, metrics: dict | None = None) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if not self.active:
            return
        if metrics is not None:
            write_json_atomic(self.out_dir / "metrics.json", metrics)
        if self.live is not None:
            self.live.end()
            self.live = None
