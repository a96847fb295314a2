"""Training checkpoints: `checkpoints/step_NNNNNNNN/` holding `model.safetensors` (weights + model
config), `optimizer.safetensors` (optimizer tensors) and `state.json` (step, epoch, variant,
optimizer hyper-parameters). Each is written into a hidden temp folder that is renamed into place, so
a kill mid-write never replaces the last good checkpoint. No RNG state is stored: the loop reseeds
from (seed, step, rank) every step and data augmentation from (seed, epoch, index) every sample.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from semanticmim.errors import InputError
from semanticmim.serialization import load_state_strict, model_config, model_kind, read_model_header, save_model

PREFIX = "step_"


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors for safetensors, JSON-able rest)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        param_id, key = flat.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f".tmp-{PREFIX}{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, tmp / "model.safetensors")
    tensors, rest = flatten_optimizer(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": rest}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders of interrupted writes are ignored)."""
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir()
                  if path.name.startswith(PREFIX) and (path / "state.json").is_file())


class StaleCheckpoint(InputError):
    """The checkpoint was written by a run with other settings (variant, architecture or recipe)."""


def check_compatible(path: Path, model: nn.Module, variant: str, settings: str) -> dict:
    """The checkpoint's state, or a one-line StaleCheckpoint saying what differs."""
    state = _read_state(path / "state.json")
    advice = "use another output folder or delete its checkpoints/"
    if state.get("variant") != variant:
        raise StaleCheckpoint(f"{path}: checkpoint has variant={state.get('variant')!r} but this run has "
                              f"variant={variant!r}; {advice}")
    header = read_model_header(path / "model.safetensors")
    if header["config"] != model_config(model) or header["kind"] != model_kind(model):
        raise StaleCheckpoint(f"{path}: checkpoint is of another architecture ({header['config']}); {advice}")
    if state.get("settings") != settings:
        raise StaleCheckpoint(f"{path}: checkpoint was written with other training settings (fingerprint "
                              f"{state.get('settings')} != {settings}); {advice}")
    return state


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, variant: str,
                    settings: str) -> dict:
    """Restore model and optimizer from `path`; refuse one from another variant, architecture or recipe."""
    state = check_compatible(path, model, variant, settings)
    load_state_strict(model, _read_tensors(path / "model.safetensors"), str(path))
    tensors = _read_tensors(path / "optimizer.safetensors")
    try:
        optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
    except (KeyError, TypeError, ValueError) as error:  # a state.json / optimizer.safetensors of another run
        raise InputError(f"{path}: optimizer state does not fit this run's optimizer ({_first_line(error)}); "
                         f"{_DAMAGED}") from None
    return state


_DAMAGED = "delete this checkpoint folder to resume from an earlier one, or its checkpoints/ to start afresh"


def _read_state(path: Path) -> dict:
    """A checkpoint's state.json, or a one-line InputError (truncated, not JSON, not an object)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable checkpoint state ({_first_line(error)}); {_DAMAGED}") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: checkpoint state must be a JSON object, got {type(state).__name__}; {_DAMAGED}")
    return state


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file, or a one-line InputError (missing, truncated, foreign)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: unreadable checkpoint file ({_first_line(error)}); {_DAMAGED}") from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
