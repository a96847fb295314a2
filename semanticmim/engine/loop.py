"""The one training loop: every pretraining variant and the dVAE, on CPU, one GPU or many (DDP).

A `Task` turns a batch into a loss; the loop owns everything else: sampling, gradient accumulation,
clipping, the per-step lr, mixed precision, checkpoints and resume, logging, and failure handling.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from semanticmim.data.loader import build_loader, sample_seed, set_epoch
from semanticmim.engine.checkpoint import StaleCheckpoint, list_checkpoints, load_checkpoint, save_checkpoint
from semanticmim.engine.distributed import DistEnv, all_reduce_mean
from semanticmim.engine.optim import build_adamw, build_schedule
from semanticmim.engine.progress import Reporter
from semanticmim.engine.timing import PhaseTimer
from semanticmim.errors import InputError
from semanticmim.models.factory import save_model


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


@dataclass(frozen=True)
class Schedule:
    """How long and how hard to train; the lr is already scaled to the global batch."""

    epochs: int
    batch_size: int  # per device
    effective_batch: int
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None


@dataclass(frozen=True)
class RunOptions:
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    amp: str = "auto"
    compile: bool = False
    num_workers: int = 2
    quiet: bool = False
    discard_stale: bool = False  # delete checkpoints of other settings instead of refusing them
    profile: bool = False  # on CUDA: synchronise around step phases to report where time goes


@dataclass
class Plan:
    """Batch arithmetic, derived once and recorded in the outputs."""

    per_device_batch: int
    world_size: int
    accumulation: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    notes: list[str] = field(default_factory=list)


def plan_batches(schedule: Schedule, num_samples: int, world_size: int) -> Plan:
    """Accumulation makes the per-device batch up to the recipe's effective batch."""
    per_step = schedule.batch_size * world_size
    accumulation = max(1, round(schedule.effective_batch / per_step))
    global_batch = per_step * accumulation
    notes = []
    if global_batch != schedule.effective_batch:
        notes.append(f"effective batch {global_batch} differs from the recipe's {schedule.effective_batch} "
                     f"({schedule.batch_size} per device x {world_size} devices x {accumulation} accumulation)")
    steps_per_epoch = num_samples // world_size // (schedule.batch_size * accumulation)
    if steps_per_epoch < 1:
        raise InputError(f"dataset has {num_samples} images, fewer than one global batch of {global_batch}")
    total = steps_per_epoch * schedule.epochs
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    return Plan(schedule.batch_size, world_size, accumulation, global_batch, steps_per_epoch, total, warmup, notes)


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


def train(task: Task, dataset: Dataset, schedule: Schedule, options: RunOptions, env: DistEnv, out_dir: Path,
          run_info: dict | None = None, settings: str = "",
          make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
          make_lr_schedule: Callable[[torch.optim.Optimizer, Plan], Any] | None = None) -> dict:
    """Train `task.model` on `dataset`; resume from `out_dir/checkpoints` when there is one.

    `settings` fingerprints everything that defines the run (recipe, data, seed): a checkpoint is
    only resumed by a run with the same fingerprint. By default the optimizer is the pretraining AdamW
    and the lr follows warmup + cosine; evaluation protocols pass their own (`make_optimizer(model)`,
    `make_lr_schedule(optimizer, plan)` returning an object with `step_update(step)`).

    Returns the final metrics (also in `metrics.json`); raises TrainingDiverged on a NaN loss and
    re-raises KeyboardInterrupt after saving a checkpoint.
    """
    plan = plan_batches(schedule, len(dataset), env.world_size)
    model = task.model.to(env.device)
    if make_optimizer is None:
        optimizer = build_adamw(model, schedule.lr, schedule.weight_decay, schedule.betas, schedule.eps, env.device)
    else:
        optimizer = make_optimizer(model)
    if make_lr_schedule is None:
        lr_schedule = build_schedule(optimizer, plan.total_steps, plan.warmup_steps, schedule.min_lr)
    else:
        lr_schedule = make_lr_schedule(optimizer, plan)
    reporter = Reporter(out_dir, env.is_main, options.quiet, run_info=run_info, plan=plan)
    step, last_loss = resume(out_dir / "checkpoints", model, optimizer, task.name, settings, options.discard_stale,
                             reporter.warn)
    reporter.open_live(resumed=step > 0)
    module = wrap_model(model, env)
    forward_module = torch.compile(module) if options.compile else module
    loader = build_loader(dataset, plan.per_device_batch, shuffle=True, num_workers=options.num_workers,
                          seed=options.seed, drop_last=True, distributed=env.distributed)
    timer = PhaseTimer(env.device, options.profile)
    if hasattr(task, "timer"):
        task.timer = timer
    start_time, start_step = time.perf_counter(), step

    def checkpoint() -> None:
        if env.is_main:
            state = {"variant": task.name, "settings": settings, "epoch": step // plan.steps_per_epoch,
                     "loss": last_loss}
            save_checkpoint(out_dir / "checkpoints", step, model, optimizer, state, options.keep_checkpoints)

    try:
        for epoch in range(step // plan.steps_per_epoch, schedule.epochs):
            in_epoch = step - epoch * plan.steps_per_epoch
            set_epoch(loader, epoch, start=in_epoch * plan.per_device_batch * plan.accumulation)
            reporter.start_epoch(epoch, schedule.epochs, plan.steps_per_epoch, in_epoch)
            groups = micro_batches(loader, plan.accumulation)
            while True:
                tick = time.perf_counter()
                with timer("data"):
                    group = next(groups, None)
                if group is None:
                    break
                lr_schedule.step_update(step)
                try:
                    with timer("forward_backward"):
                        loss = accumulate(task, module, forward_module, group, step, env, options)
                except Exception as error:  # torch.compile fails at the first call on unsupported platforms
                    if forward_module is module or isinstance(error, TrainingDiverged):
                        raise
                    reporter.warn(f"torch.compile failed ({str(error).splitlines()[0][:120]}); running eagerly")
                    forward_module = module
                    optimizer.zero_grad(set_to_none=True)
                    loss = accumulate(task, module, forward_module, group, step, env, options)
                with timer("optimizer"):
                    grad_norm = clip_and_step(model, optimizer, schedule.clip_grad)
                step += 1
                last_loss = loss
                reporter.log_step(step, loss, optimizer.param_groups[0]["lr"], float(grad_norm),
                                  plan.global_batch / (time.perf_counter() - tick), options.log_every)
                if step % options.checkpoint_every == 0 or step == plan.total_steps:
                    checkpoint()
            reporter.end_epoch(epoch, last_loss)
    except KeyboardInterrupt:
        checkpoint()
        reporter.close()
        raise
    seconds = time.perf_counter() - start_time
    trained = step - start_step
    metrics = {
        "final_loss": float(all_reduce_mean(torch.tensor(last_loss))),
        "steps": step,
        "img_per_s": trained * plan.global_batch / seconds if trained else 0.0,
        "wall_time_s": seconds,
        "peak_memory_mb": peak_memory_mb(env.device),
        "time_share": timer.shares(seconds),
    }
    if env.is_main:
        save_model(model, out_dir / "model.safetensors")
    reporter.close(metrics)
    return metrics


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


def resume(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, name: str, settings: str,
           discard_stale: bool, reporter_warn) -> tuple[int, float]:
    """Load the newest checkpoint, if any; return the step to continue from and its loss.

    A checkpoint of other settings is an error, or, with `discard_stale` (what `dvc repro` asks for
    after a params change), deleted with a warning so the run starts afresh."""
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return 0, float("nan")
    try:
        state = load_checkpoint(checkpoints[-1], model, optimizer, name, settings)
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
