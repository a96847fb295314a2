"""The loop's evaluation hook and what a rerun of a finished run writes: evaluations at the right epochs
or steps, kept across resumes, never repeated; a finished run rerun with its outputs removed writes the
same model and metrics again."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import Evaluation, RunOptions, to_device, train
from semanticmim.engine.recipe import Schedule


@dataclass
class Regression:
    model: nn.Module
    name: str = "regression"

    def loss(self, module: nn.Module, batch, step: int) -> torch.Tensor:
        inputs, targets = to_device(batch, torch.device("cpu"))
        return nn.functional.mse_loss(module(inputs), targets)

    def to(self, device: torch.device) -> Regression:
        return self


def dataset(count: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(count, 4, generator=generator)
    return TensorDataset(inputs, inputs @ torch.arange(4.0)[:, None])


def run(out: Path, schedule: Schedule, every: int = 1, unit: str = "epoch", calls: list | None = None) -> dict:
    torch.manual_seed(0)
    task = Regression(nn.Linear(4, 1))
    calls = [] if calls is None else calls

    def evaluate(at: int) -> dict[str, float]:
        calls.append(at)
        with torch.no_grad():
            inputs, targets = dataset()[:]
            return {"mse": float(nn.functional.mse_loss(task.model(inputs), targets))}

    options = RunOptions(checkpoint_every=1000, log_every=1, num_workers=0, quiet=True)
    return train(task, dataset(), schedule, options, DistEnv(), out, fingerprint="f",
                 evaluate=Evaluation(evaluate, every, unit))  # type: ignore[arg-type]


SCHEDULE = Schedule(epochs=5, batch_size=8, effective_batch=8, lr=0.05, min_lr=0.0, warmup_epochs=0.0,
                    weight_decay=0.0)


def test_evaluations_follow_every_and_always_include_the_last_epoch(tmp_path):
    calls: list = []
    metrics = run(tmp_path / "run", SCHEDULE, every=2, calls=calls)
    assert metrics["history"].points == [2, 4, 5] and calls == [2, 4, 5]  # the hook is told which epoch
    mse = [record["mse"] for record in metrics["history"].records]
    assert mse[0] > mse[-1]  # training helps, so the evaluations really see the weights of their epoch
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [record["epoch"] for record in saved["records"]] == [2, 4, 5]


def test_step_based_length_and_evaluation(tmp_path):
    schedule = Schedule(**{**vars(SCHEDULE), "steps": 10})
    metrics = run(tmp_path / "run", schedule, every=4, unit="step")
    assert metrics["steps"] == 10 and metrics["history"].points == [4, 8, 10]


def test_a_run_killed_before_an_evaluation_resumes_evaluates_it_and_reaches_the_same_weights(tmp_path):
    whole = run(tmp_path / "whole", SCHEDULE)
    calls: list = []

    class Killed(list):
        def append(self, item) -> None:
            super().append(item)
            if len(self) == 3:
                raise KeyboardInterrupt  # Ctrl-C while epoch 3 is being evaluated

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "part", SCHEDULE, calls=Killed())
    history = json.loads((tmp_path / "part" / "history.json").read_text())["records"]
    assert [r["epoch"] for r in history] == [1, 2]
    resumed = run(tmp_path / "part", SCHEDULE, calls=calls)
    assert calls == [3, 4, 5] and resumed["history"].points == [1, 2, 3, 4, 5]  # epoch 3 first, then 4 and 5
    part, uninterrupted = (tmp_path / folder / "model.safetensors" for folder in ("part", "whole"))
    assert part.read_bytes() == uninterrupted.read_bytes()
    assert [r["mse"] for r in resumed["history"].records] == [r["mse"] for r in whole["history"].records]


def test_a_finished_run_rerun_without_its_outputs_writes_them_again(tmp_path):
    """What `dvc repro` does to a stage whose params section changed elsewhere: outputs removed, persisted
    checkpoints kept. The rerun trains nothing, evaluates nothing, and writes the same files."""
    out = tmp_path / "run"
    calls: list = []
    first = run(out, SCHEDULE, calls=calls)
    metrics_before = json.loads((out / "metrics.json").read_text())
    model_before = (out / "model.safetensors").read_bytes()
    for output in ("metrics.json", "model.safetensors"):
        (out / output).unlink()
    again = run(out, SCHEDULE, calls=calls)
    assert len(calls) == 5  # the rerun evaluated nothing
    assert json.loads((out / "metrics.json").read_text()) == metrics_before
    assert (out / "model.safetensors").read_bytes() == model_before
    assert again["img_per_s"] == first["img_per_s"] > 0 and again["history"].points == [1, 2, 3, 4, 5]
