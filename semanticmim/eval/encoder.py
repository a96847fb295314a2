"""Load an encoder exported in timm format (`model.safetensors` + `config.json`, DESIGN §6), so every
protocol also evaluates any third-party timm ViT checkpoint (MAE, DINO, ...) exported the same way."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from semanticmim.errors import InputError


@dataclass
class Encoder:
    """A frozen-or-not timm ViT plus what identifies it in every metrics.json."""

    model: nn.Module  # timm VisionTransformer, num_classes=0
    config: dict  # config.json: {"architecture", "kwargs"}
    identity: dict  # {"path", "sha256"} of the weights file

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    def check_block(self, block: int, key: str = "block") -> int:
        """Validate a 1-based block index against the depth."""
        if not 1 <= block <= self.depth:
            raise InputError(f"{key}={block} is outside the encoder's blocks 1..{self.depth}")
        return block

    def block_tokens(self, images: torch.Tensor, blocks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images: (B, 3, H, W) -> per requested 1-based block, (prefix (B, K, D), patches (B, N, D)) of
        that block's output, before any final norm."""
        outputs = self.model.forward_intermediates(
            images, indices=[self.check_block(b) - 1 for b in blocks], norm=False, output_fmt="NLC",
            intermediates_only=True, return_prefix_tokens=True)
        return [(prefix, patches) for patches, prefix in outputs]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_encoder(export_dir: str | Path, img_size: int | None = None, **overrides) -> Encoder:
    """Build the timm model named in `config.json` and load `model.safetensors` strictly.

    img_size: evaluate at another resolution (the position embedding is resampled, e.g. 448 for VOC).
    overrides: timm kwargs that do not change the weights' shapes, e.g. `drop_path_rate=0.1` to fine-tune.
    Missing or unexpected keys are a one-line InputError, never a warning.
    """
    export_dir = Path(export_dir)
    config_path, weights_path = export_dir / "config.json", export_dir / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise InputError(f"{export_dir}: not a timm-format encoder export (expected config.json and model.safetensors; "
                         "make one with `semanticmim export CHECKPOINT --to timm DIR`)")
    try:
        config = json.loads(config_path.read_text())
        architecture, kwargs = config["architecture"], dict(config.get("kwargs", {}))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise InputError(f"{config_path}: expected JSON with 'architecture' and 'kwargs' ({error})") from None
    kwargs.update(overrides)
    if img_size is not None:
        kwargs.update(img_size=img_size, dynamic_img_size=True)
    try:
        model = timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, ValueError) as error:
        raise InputError(f"{config_path}: timm cannot build {architecture!r} with these kwargs ({error})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise InputError(f"{weights_path}: not a safetensors file ({str(error).splitlines()[0]})") from None
    if img_size is not None and "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=grid,
                                                    num_prefix_tokens=model.num_prefix_tokens)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{weights_path}: does not match {architecture}: missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    return Encoder(model, config, {"path": str(weights_path), "sha256": file_sha256(weights_path)})
