"""Where a training step's time goes: data, targets, forward/backward, optimizer, everything else."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

PHASES = ("data", "targets", "forward_backward", "optimizer", "other")


class PhaseTimer:
    """Accumulates wall time per phase. On CUDA it synchronises around phases only when `enabled`
    (`bench --loop`), since a sync per phase would cost the overlap it measures; on CPU it is free."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.sync = enabled and device.type == "cuda"
        self.active = enabled or device.type != "cuda"
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not self.active:
            yield
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start

    def shares(self, total_seconds: float) -> dict[str, float]:
        """Fraction of `total_seconds` per phase; forward_backward excludes the targets timed inside it."""
        if not self.active or total_seconds <= 0:
            return {}
        seconds = dict(self.seconds)
        seconds["forward_backward"] = seconds.get("forward_backward", 0.0) - seconds.get("targets", 0.0)
        seconds["other"] = total_seconds - sum(seconds.get(p, 0.0) for p in PHASES if p != "other")
        return {phase: round(seconds.get(phase, 0.0) / total_seconds, 4) for phase in PHASES}


def no_timer(_phase: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()
