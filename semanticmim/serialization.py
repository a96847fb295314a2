"""Self-describing weight files: one safetensors file holding the weights and, in its metadata, the
model's kind and config (nanoGPT's `model_args`, as JSON). Written atomically (temp file, then rename);
loaded strictly, with one-line errors. Knows nothing of the model classes: a model names its own kind
(`checkpoint_kind`, else its class name) and config (`config.to_dict()`); `models.factory.load_model`
maps kinds back to classes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn

from semanticmim.errors import InputError

METADATA_KEY = "semanticmim"


def model_kind(model: nn.Module) -> str:
    """The name `load_model` rebuilds a model from (`checkpoint_kind`), else its class name (weights only)."""
    return getattr(model, "checkpoint_kind", type(model).__name__)


def model_config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def save_model(model: nn.Module, path: str | Path) -> None:
    """Write weights + kind + config to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    header = {"kind": model_kind(model), "config": model_config(model)}
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(header)})
    os.replace(tmp, path)


def read_model_header(path: str | Path) -> dict:
    """The `{"kind", "config"}` header of a saved model, or a one-line InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file (expected a model.safetensors written by semanticmim)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: not a safetensors file ({str(error).splitlines()[0]})") from None
    if METADATA_KEY not in metadata:
        raise InputError(f"{path}: safetensors file has no '{METADATA_KEY}' metadata (not a semanticmim model)")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: '{METADATA_KEY}' metadata is not JSON ({error})") from None
    if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
        raise InputError(f"{path}: '{METADATA_KEY}' metadata must be a JSON object with 'kind' and 'config'")
    header.setdefault("config", None)
    return header


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict(strict=True)` whose failures are one line naming the first offending key."""
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise InputError(f"{source}: does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise InputError(f"{source}: {name} has shape {tuple(tensor.shape)}, model expects "
                             f"{tuple(own[name].shape)}")
    model.load_state_dict(state, strict=True)
