"""The one training loop: every pretraining variant and the dVAE, on CPU, one GPU or many (DDP).

A `Task` turns a batch into a loss; the loop owns everything else: sampling, gradient accumulation,
clipping, the per-step lr, mixed precision, checkpoints and resume, logging, and failure handling.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import ConfigDict, NonNegativeInt, PositiveInt
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, IterableDataset

from semanticmim.data.loader import build_loader, sample_seed, set_epoch
from semanticmim.engine.checkpoint import PREFIX, StaleCheckpoint, list_checkpoints, load_checkpoint, save_checkpoint
from semanticmim.engine.distributed import DistEnv, all_reduce_mean
from semanticmim.engine.history import History, Unit, evaluation_points
from semanticmim.engine.optim import build_adamw, build_schedule
from semanticmim.engine.progress import Reporter, write_json_atomic
from semanticmim.engine.recipe import Plan, Schedule, plan_batches
from semanticmim.engine.timing import PhaseTimer
from semanticmim.serialization import save_model


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Task(Protocol):
    name: str
    model: nn.Module  # everything that is trained and saved

    def loss(self, module: nn.Module, batch: Any, step: int) -> torch.Tensor:
        """One micro-batch's loss. `module` is `model`, possibly DDP-wrapped or compiled. The global
        torch RNG is seeded from (seed, step, rank, micro-step) before each call."""
        ...

    def to(self, device: torch.device) -> Task:
        """Move what the task owns besides `model` (targets) to `device`."""
        ...

    # optional: `before_step(step)`, called once per optimizer step before its first micro-batch
    # (MoCo v3's momentum update: once per step, whatever the gradient accumulation)


@dataclass(frozen=True)
class RunOptions:
    """How a training run executes, not what it computes (params: a stage's `run` section)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # pydantic validates this dataclass in params files

    seed: int = 0
    checkpoint_every: PositiveInt = 500  # optimizer steps
    keep_checkpoints: PositiveInt = 3
    log_every: PositiveInt = 10
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    profile: bool = False  # on CUDA: synchronise around step phases to report where time goes
    discard_stale: bool = False  # delete checkpoints of other settings instead of refusing them (dvc.yaml)
    num_workers: NonNegativeInt = 2  # set by the stage from its data section (data.num_workers / num_workers)
    quiet: bool = False  # set by the stage from --quiet


def to_device(batch, device: torch.device):
    """A tensor, or nested tuples/lists of tensors, moved to `device` (non-blocking)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(item, device) for item in batch)


def share_cpu_with_workers(env: DistEnv, num_workers: int) -> None:
    """On CPU, leave the DataLoader workers their cores: more compute threads than free cores make
    OpenMP threads spin against each other, which on a 2-core laptop slows training tenfold or more.
    (torchrun already starts each of several processes with one thread.)"""
    if env.device.type == "cpu" and num_workers > 0 and env.world_size == 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))


def dataset_size(dataset: Dataset, env: DistEnv) -> int:
    """All samples of an epoch; a streaming dataset (shards) reports its per-rank share as its length."""
    return len(dataset) * env.world_size if isinstance(dataset, IterableDataset) else len(dataset)


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def micro_batches(loader: DataLoader, accumulation: int) -> Iterator[list]:
    batches = iter(loader)
    while True:
        group = []
        for _ in range(accumulation):
            batch = next(batches, None)
            if batch is None:
                return
            group.append(batch)
        yield group


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float | None) -> torch.Tensor:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


@dataclass
class Evaluation:
    """What the loop evaluates while it trains, and when: `run(at)` (which puts the model in eval mode and
    back, on every rank; `at` = the epoch or step just completed) after every `every`-th epoch or optimizer
    step, and always at the end. Results go
    to `out_dir/history.json` (kept across resumes), dvclive (`eval/*`) and the returned metrics."""

    run: Callable[[int], dict[str, float]]
    every: int = 1
    unit: Unit = "epoch"


FINAL_METRICS = "final_metrics.json"  # beside the checkpoints: a rerun that finds the run done reuses them


def train(task: Task, dataset: Dataset, schedule: Schedule, options: RunOptions, env: DistEnv, out_dir: Path,
          run_info: dict | None = None, fingerprint: str = "",
          make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
          make_lr_schedule: Callable[[torch.optim.Optimizer, Plan], Any] | None = None,
          evaluate: Evaluation | None = None) -> dict:
    """Train `task.model` on `dataset`; resume from `out_dir/checkpoints` when there is one.

    `fingerprint` identifies everything that defines the run (recipe, data, seed): a checkpoint is
    only resumed by a run with the same fingerprint. By default the optimizer is the pretraining AdamW
    and the lr follows warmup + cosine; evaluation protocols pass their own (`make_optimizer(model)`,
    `make_lr_schedule(optimizer, plan)` returning an object with `step_update(step)`) and an `evaluate`
    hook. The run lasts `schedule.epochs` epochs, or `schedule.steps` optimizer steps when set.

    Every output is written even when the run is already complete (a rerun by `dvc repro` after its
    outputs were removed): the model and `metrics.json` (the finished run's, kept beside the
    checkpoints); the dvclive folder persists beside the checkpoints (dvc.yaml) and is reset with
    them. Returns the final metrics, with `history` (the evaluations) when `evaluate` is given;
    raises TrainingDiverged on a NaN loss and re-raises KeyboardInterrupt after saving a checkpoint.
    """
    plan = plan_batches(schedule, dataset_size(dataset, env), env.world_size)
    share_cpu_with_workers(env, options.num_workers)
    if run_info is not None and "device" in run_info:
        run_info["device"]["torch_threads"] = torch.get_num_threads()
    model = task.model.to(env.device)
    optimizer = (make_optimizer or (lambda m: build_adamw(m, schedule.lr, schedule.weight_decay, schedule.betas,
                                                          schedule.eps, env.device)))(model)
    lr_schedule = (make_lr_schedule or (lambda o, p: build_schedule(o, p.total_steps, p.warmup_steps,
                                                                    schedule.min_lr)))(optimizer, plan)
    reporter = Reporter(out_dir, env.is_main, options.quiet, run_info=run_info, plan=plan)
    step, loss = resume(out_dir / "checkpoints", model, optimizer, task.name, fingerprint, options.discard_stale,
                        reporter.warn)
    reporter.open_live(resumed=step > 0)
    loader = build_loader(dataset, plan.per_device_batch, shuffle=True, num_workers=options.num_workers,
                          seed=options.seed, drop_last=True, distributed=env.distributed)
    history = (History.load(out_dir / "history.json", fingerprint, evaluate.unit) if evaluate is not None
               else None)
    run = Run(task, plan, schedule, options, env, out_dir, fingerprint, optimizer, lr_schedule, reporter,
              PhaseTimer(env.device, options.profile), wrap_model(model, env), step, loss, evaluate, history)
    start_time, start_step = time.perf_counter(), step
    try:
        run.evaluate_if_due()  # a kill between the checkpoint and its evaluation
        for epoch in range(step // plan.steps_per_epoch, math.ceil(plan.total_steps / plan.steps_per_epoch)):
            run.train_epoch(loader, epoch)
    except KeyboardInterrupt:
        run.checkpoint()
        reporter.close()
        raise
    metrics = finished_metrics(run, time.perf_counter() - start_time, start_step)
    if env.is_main:
        save_model(model, out_dir / "model.safetensors")
    reporter.close(metrics)
    return {**metrics, "history": history} if history is not None else metrics


def finished_metrics(run: Run, seconds: float, start_step: int) -> dict:
    """The run's metrics; for a run that was already complete, those it recorded when it finished."""
    saved = run.out_dir / "checkpoints" / FINAL_METRICS
    if start_step == run.plan.total_steps and saved.is_file():
        return json.loads(saved.read_text())["metrics"]
    metrics = run.metrics(seconds, start_step)
    if run.env.is_main and start_step < run.plan.total_steps:
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(saved, {"fingerprint": run.fingerprint, "metrics": metrics})
    return metrics


@dataclass
class Run:
    """The state of one training run between optimizer steps."""

    task: Task
    plan: Plan
    schedule: Schedule
    options: RunOptions
    env: DistEnv
    out_dir: Path
    fingerprint: str
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    reporter: Reporter
    timer: PhaseTimer
    module: nn.Module  # the model, DDP-wrapped under torchrun
    step: int = 0
    last_loss: float = float("nan")
    evaluation: Evaluation | None = None
    history: History | None = None

    def __post_init__(self) -> None:
        self.forward_module = torch.compile(self.module) if self.options.compile else self.module
        if hasattr(self.task, "timer"):
            self.task.timer = self.timer

    def train_epoch(self, loader: DataLoader, epoch: int) -> None:
        in_epoch = self.step - epoch * self.plan.steps_per_epoch
        streaming = isinstance(loader.dataset, IterableDataset)
        skip = 0 if streaming else in_epoch * self.plan.per_device_batch * self.plan.accumulation
        set_epoch(loader, epoch, start=skip)
        self.reporter.start_epoch(epoch, self.schedule.epochs, self.plan.steps_per_epoch, in_epoch)
        groups = micro_batches(loader, self.plan.accumulation)
        if streaming:  # a stream cannot seek: replay the epoch's first steps (same order) without training
            for _ in range(in_epoch):
                next(groups, None)
        while True:
            tick = time.perf_counter()
            with self.timer("data"):
                group = next(groups, None)
            if group is None:
                break
            grad_norm = self.train_step(group)
            self.reporter.log_step(self.step, self.last_loss, self.optimizer.param_groups[0]["lr"], grad_norm,
                                   self.plan.global_batch / (time.perf_counter() - tick), self.options.log_every)
            if self.step % self.options.checkpoint_every == 0 or self.step == self.plan.total_steps:
                self.checkpoint()
            if self.evaluation is not None and self.evaluation.unit == "step":
                self.evaluate_if_due()
            if self.step == self.plan.total_steps:
                break
        self.reporter.end_epoch(epoch, self.last_loss)
        if self.evaluation is not None and self.evaluation.unit == "epoch":
            self.evaluate_if_due()

    def evaluation_point(self) -> int | None:
        """The epoch (or step) just completed, if the evaluation is due there and not yet recorded."""
        if self.evaluation is None or self.history is None or self.step == 0:
            return None
        if self.evaluation.unit == "epoch":
            if self.step % self.plan.steps_per_epoch and self.step != self.plan.total_steps:
                return None
            at, total = math.ceil(self.step / self.plan.steps_per_epoch), self.schedule.epochs
        else:
            at, total = self.step, self.plan.total_steps
        due = at in evaluation_points(total, self.evaluation.every)
        return at if due and at not in self.history.points else None

    def evaluate_if_due(self) -> None:
        at = self.evaluation_point()
        if at is None:
            return
        values = self.evaluation.run(at)
        self.history.record(at, values, write=self.env.is_main)
        self.reporter.log_values(self.step, values, "eval/")
        newest = list_checkpoints(self.out_dir / "checkpoints")
        if not newest or newest[-1].name != f"{PREFIX}{self.step:08d}":
            self.checkpoint()  # so that a resumed run starts from the weights this evaluation saw

    def train_step(self, group: list) -> float:
        """One optimizer step over the micro-batches in `group`; returns the gradient norm."""
        self.lr_schedule.step_update(self.step)
        if hasattr(self.task, "before_step"):
            self.task.before_step(self.step)
        try:
            with self.timer("forward_backward"):
                loss = accumulate(self.task, self.module, self.forward_module, group, self.step, self.env,
                                  self.options)
        except Exception as error:  # torch.compile fails at the first call on unsupported platforms
            if self.forward_module is self.module or isinstance(error, TrainingDiverged):
                raise
            self.reporter.warn(f"torch.compile failed ({str(error).splitlines()[0][:120]}); running eagerly")
            self.forward_module = self.module
            self.optimizer.zero_grad(set_to_none=True)
            loss = accumulate(self.task, self.module, self.module, group, self.step, self.env, self.options)
        with self.timer("optimizer"):
            grad_norm = clip_and_step(self.task.model, self.optimizer, self.schedule.clip_grad)
        self.step += 1
        self.last_loss = loss
        return float(grad_norm)

    def checkpoint(self) -> None:
        if self.env.is_main:
            state = {"variant": self.task.name, "settings": self.fingerprint, "loss": self.last_loss,
                     "epoch": self.step // self.plan.steps_per_epoch}
            save_checkpoint(self.out_dir / "checkpoints", self.step, self.task.model, self.optimizer, state,
                            self.options.keep_checkpoints)

    def metrics(self, seconds: float, start_step: int) -> dict:
        trained = self.step - start_step
        return {
            "final_loss": float(all_reduce_mean(torch.tensor(self.last_loss))),
            "steps": self.step,
            "img_per_s": trained * self.plan.global_batch / seconds if trained else 0.0,
            "wall_time_s": seconds,
            "peak_memory_mb": peak_memory_mb(self.env.device),
            "time_share": self.timer.shares(seconds),
        }


def accumulate(task: Task, module: nn.Module, forward_module: nn.Module, group: list, step: int, env: DistEnv,
               options: RunOptions) -> float:
    """Forward/backward over the micro-batches of one optimizer step; no all-reduce before the last."""
    total = 0.0
    for micro, batch in enumerate(group):
        stream = sample_seed(options.seed, step, env.rank * 4096 + micro)
        torch.manual_seed(stream)  # drop-path and any other global randomness: a pure function of the step
        sync = micro == len(group) - 1 or not isinstance(module, DistributedDataParallel)
        with contextlib.nullcontext() if sync else module.no_sync(), autocast_for(env.device, options.amp):
            loss = task.loss(forward_module, batch, step)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value} at step {step}; stopped, the last checkpoint is kept")
        (loss / len(group)).backward()
        total += value / len(group)
    return total


def resume(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, name: str, fingerprint: str,
           discard_stale: bool, reporter_warn) -> tuple[int, float]:
    """Load the newest checkpoint, if any; return the step to continue from and its loss.

    A checkpoint of other settings is an error, or, with `discard_stale` (what `dvc repro` asks for
    after a params change), deleted with a warning so the run starts afresh."""
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return 0, float("nan")
    try:
        state = load_checkpoint(checkpoints[-1], model, optimizer, name, fingerprint)
    except StaleCheckpoint as error:
        if not discard_stale:
            raise
        reporter_warn(f"discarding stale checkpoints: {error}")
        shutil.rmtree(directory)
        return 0, float("nan")
    return int(state["step"]), float(state["loss"])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
