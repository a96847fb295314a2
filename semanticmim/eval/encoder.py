"""Load an encoder exported in timm format (`model.safetensors` + `config.json`, the public API), so every
protocol also evaluates any third-party timm ViT checkpoint (MAE, DINO, ...) exported the same way.

config.json: `{"architecture": timm name, "kwargs": {...}}`, optionally with the normalisation the
encoder was trained with, either at the top level (`"mean"`, `"std"`) or in timm's `"pretrained_cfg"`
dict; ImageNet's when absent. Values are on timm's 0–1 pixel scale.

Every bad input is a one-line `InputError` naming the file and what is wrong in it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from semanticmim.errors import InputError

Triple = tuple[float, float, float]


@dataclass(frozen=True)
class Normalization:
    """Per-channel pixel mean/std on timm's 0–1 scale: uint8 (..., 3, H, W) -> float32 normalised, on the
    pixels' device. Small and picklable: data workers normalise with it (the segmentation views)."""

    mean: Triple = IMAGENET_DEFAULT_MEAN
    std: Triple = IMAGENET_DEFAULT_STD

    @property
    def is_imagenet(self) -> bool:
        return tuple(self.mean) == tuple(IMAGENET_DEFAULT_MEAN) and tuple(self.std) == tuple(IMAGENET_DEFAULT_STD)

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of shape (3, 1, 1): normalised = pixels * scale + shift."""
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return (1 / (255 * std)).to(device), (-mean / std).to(device)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:  # a float input was converted once already: normalising twice is silent
            raise TypeError(f"expected uint8 pixels (a transform's output), got {pixels.dtype}")
        scale, shift = self.constants(pixels.device)
        return pixels.float().mul_(scale).add_(shift)


@dataclass
class Encoder:
    """A frozen-or-not timm ViT plus what identifies it in every run.json."""

    model: nn.Module  # timm VisionTransformer, num_classes=0
    config: dict  # config.json: {"architecture", "kwargs"} (+ optional mean/std)
    identity: dict  # {"path", "sha256"} of the weights file
    mean: Triple = IMAGENET_DEFAULT_MEAN  # per-channel pixel mean, 0–1 scale
    std: Triple = IMAGENET_DEFAULT_STD
    _norm_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def normalization(self) -> Normalization:
        return Normalization(tuple(self.mean), tuple(self.std))

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

    def require_prefix(self, what: str, instead: str = "poolings: [patch]") -> None:
        """One-line InputError when the encoder has no prefix token for `what` (e.g. `cls` pooling) to read.

        what: the setting that needs it, e.g. "eval.linear_cls.poolings"; instead: the hint to print."""
        if self.num_prefix_tokens == 0:
            raise InputError(f"{what}: {self.identity['path']} has no prefix tokens (class_token=False); "
                             f"the `cls` pooling needs one; use {instead}")

    def block_tokens(self, images: torch.Tensor, blocks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """images: (B, 3, H, W) -> per requested 1-based block, (prefix (B, K, D), patches (B, N, D)) of
        that block's output, before any final norm. K = num_prefix_tokens, possibly 0 (an empty tensor)."""
        outputs = self.model.forward_intermediates(
            images, indices=[self.check_block(b) - 1 for b in blocks], norm=False, output_fmt="NLC",
            intermediates_only=True, return_prefix_tokens=True)
        if self.num_prefix_tokens == 0:  # timm then returns bare patch tensors, not (patches, prefix) pairs
            return [(patches.new_empty(patches.shape[0], 0, patches.shape[2]), patches) for patches in outputs]
        return [(prefix, patches) for patches, prefix in outputs]

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32 (..., 3, H, W) normalised with this encoder's mean/std, on the
        pixels' device. With ImageNet's constants, bit-identical to `semanticmim.data.transforms.normalize`."""
        if pixels.dtype != torch.uint8:  # a float input was converted once already: normalising twice is silent
            raise TypeError(f"expected uint8 pixels (a transform's output), got {pixels.dtype}")
        if pixels.device not in self._norm_cache:
            self._norm_cache[pixels.device] = self.normalization.constants(pixels.device)
        scale, shift = self._norm_cache[pixels.device]
        return pixels.float().mul_(scale).add_(shift)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_encoder(export_dir: str | Path, img_size: int | None = None, size_key: str = "img_size",
                 **overrides) -> Encoder:
    """Build the timm model named in `config.json`, load `model.safetensors` strictly, then resize it.

    img_size: evaluate at another resolution, e.g. 448 for VOC. The weights are checked against the
    config's own size first, then timm's `set_input_size` resamples the position embedding (over the
    patch grid only: prefix tokens keep theirs, and `no_embed_class` models have none to keep) and the
    model accepts any multiple of the patch size at run time (`dynamic_img_size`).
    size_key: the setting `img_size` comes from, named when it is not a multiple of the patch size
    (e.g. "eval.finetune_seg.crop_size").
    overrides: timm kwargs that do not change the weights' shapes, e.g. `drop_path_rate=0.1` to fine-tune.
    Missing or unexpected keys and shapes that disagree with config.json are one-line InputErrors.
    """
    export_dir = Path(export_dir)
    config_path, weights_path = export_dir / "config.json", export_dir / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise InputError(f"{export_dir}: not a timm-format encoder export (expected config.json and model.safetensors, "
                         "as the timm export writes them)")
    config, architecture, kwargs = _read_config(config_path)
    mean, std = _normalization(config, config_path)
    kwargs.update(overrides)
    if img_size is not None:
        kwargs["dynamic_img_size"] = True  # shape-neutral; lets the resized model take any multiple of the patch
    try:
        model = timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as error:
        raise InputError(f"{config_path}: timm cannot build {architecture!r} with these kwargs "
                         f"({_first_line(error)})") from None
    vit_api = ("patch_embed", "blocks", "num_prefix_tokens", "forward_intermediates")
    if not all(hasattr(model, name) for name in vit_api):
        raise InputError(f"{config_path}: {architecture!r} is not a timm ViT (no patch_embed, blocks or prefix tokens)")
    target = _check_img_size(model, img_size, size_key, config_path)
    state = _read_weights(weights_path)
    _check_state(model, state, weights_path, config_path, architecture)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:  # checked above; kept one line should timm ever add a check of its own
        raise InputError(f"{weights_path}: does not load into {architecture} ({_first_line(error)})") from None
    if target != tuple(model.patch_embed.img_size):
        if not hasattr(model, "set_input_size"):
            raise InputError(f"{config_path}: timm's {architecture} cannot change its input size to {img_size}")
        model.set_input_size(img_size=target)
    return Encoder(model, config, {"path": str(weights_path), "sha256": file_sha256(weights_path)}, mean, std)


# ------------------------------------------------------------------------------------------ checks


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _read_config(config_path: Path) -> tuple[dict, str, dict]:
    """-> (the whole config, the timm architecture name, its kwargs)."""
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config_path}: not JSON ({_first_line(error)})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise InputError(f"{config_path}: expected a JSON object with 'architecture' (a timm model name) and 'kwargs'")
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise InputError(f"{config_path}: 'kwargs' must be an object of timm keyword arguments, "
                         f"got {type(kwargs).__name__}")
    return config, config["architecture"], dict(kwargs)


def _normalization(config: dict, config_path: Path) -> tuple[Triple, Triple]:
    """(mean, std) from config.json's top level, else its `pretrained_cfg`, else ImageNet's."""
    pretrained = config.get("pretrained_cfg")
    if pretrained is not None and not isinstance(pretrained, dict):
        raise InputError(f"{config_path}: 'pretrained_cfg' must be an object, got {type(pretrained).__name__}")
    for prefix, source in (("", config), ("pretrained_cfg.", pretrained or {})):
        if "mean" in source or "std" in source:
            if "mean" not in source or "std" not in source:
                given, absent = ("mean", "std") if "mean" in source else ("std", "mean")
                raise InputError(f"{config_path}: '{prefix}{given}' is given without '{prefix}{absent}'")
            mean = _channel_values(source["mean"], f"{prefix}mean", config_path, low=0.0, low_open=False)
            std = _channel_values(source["std"], f"{prefix}std", config_path, low=0.0, low_open=True)
            return mean, std
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def _channel_values(value, key: str, config_path: Path, low: float, low_open: bool) -> Triple:
    """3 finite numbers in (low, 1] or [low, 1]: timm's 0–1 pixel scale (0–255 values are a common slip)."""
    if (not isinstance(value, list | tuple) or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise InputError(f"{config_path}: '{key}' must be 3 numbers (one per RGB channel), got {value!r}")
    if not all((v > low if low_open else v >= low) and v <= 1 for v in value):
        bound = "in (0, 1]" if low_open else "in [0, 1]"
        raise InputError(f"{config_path}: '{key}' values must be {bound} (timm's 0–1 pixel scale), got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _check_img_size(model: nn.Module, img_size: int | None, size_key: str, config_path: Path) -> tuple[int, int]:
    """-> the (H, W) to evaluate at: `img_size` if given, else the config's; a multiple of the patch size."""
    patch = tuple(model.patch_embed.patch_size)
    shown = patch[0] if len(set(patch)) == 1 else patch
    native = model.patch_embed.img_size
    if img_size is None:
        if native is None or any(s % p for s, p in zip(native, patch, strict=True)):
            size = native[0] if native is not None and len(set(native)) == 1 else native
            raise InputError(f"{config_path}: img_size={size}: expected a multiple of the patch size {shown}")
        return tuple(native)
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or any(img_size % p for p in patch):
        raise InputError(f"{size_key}={img_size}: expected a positive multiple of the patch size {shown} "
                         f"of {config_path}")
    return img_size, img_size


def _read_weights(weights_path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{weights_path}: not a safetensors file ({_first_line(error)})") from None


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], weights_path: Path, config_path: Path,
                 architecture: str) -> None:
    """The weights' keys and shapes against the model config.json describes (at its own img_size),
    before `load_state_dict`, whose errors span many lines."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        raise InputError(f"{weights_path}: does not match {architecture}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise InputError(f"{weights_path}: '{name}' has shape {tuple(state[name].shape)} but {config_path.name} "
                             f"({architecture}, {_shape_kwargs(model)}) gives {tuple(tensor.shape)}")


def _shape_kwargs(model: nn.Module) -> str:
    """The config values that set a ViT's weight shapes, to say what disagrees with the weights."""
    reg_token, patch_embed = getattr(model, "reg_token", None), model.patch_embed
    return (f"embed_dim={getattr(model, 'embed_dim', '?')}, img_size={patch_embed.img_size}, "
            f"patch_size={patch_embed.patch_size}, class_token={getattr(model, 'cls_token', None) is not None}, "
            f"reg_tokens={0 if reg_token is None else reg_token.shape[1]}, "
            f"no_embed_class={getattr(model, 'no_embed_class', False)}")
