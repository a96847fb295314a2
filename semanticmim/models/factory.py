"""Building, saving and loading models. A saved model is one self-describing safetensors file: the
weights plus, in its metadata, the model kind and config (nanoGPT's `model_args`, as JSON)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from semanticmim.errors import InputError
from semanticmim.models.mim import MaskedImageModel, MIMConfig
from semanticmim.models.mocov3 import MoCoConfig, MoCoV3
from semanticmim.models.vit import EncoderConfig
from semanticmim.serialization import load_state_strict, read_model_header, save_model
from semanticmim.targets.dvae import DiscreteVAE, DVAEConfig

__all__ = ["build_model", "hog_dim", "load_model", "read_model_header", "save_model"]


def hog_dim(patch_size: int, cell_size: int | None = None, nbins: int = 9) -> int:
    """HOG values per patch: 3 channels x bins x cells per patch (108 for 16-px patches, 8-px cells)."""
    cell_size = cell_size or patch_size // 2
    return 3 * nbins * (patch_size // cell_size) ** 2


def build_model(
    block: str = "beit",
    semantic: bool = False,
    num_proxy: int = 1,
    img_size: int = 224,
    patch_size: int = 16,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    drop_path: float = 0.0,
    target: str | None = None,
    target_dim: int | None = None,
) -> MaskedImageModel:
    """The public constructor (the public API, README). `target` defaults to the block style's method: "dvae"
    (8192 tokens) for "beit", "hog" (3·9·(p/cell)² values, cell = p/2) for "vit"."""
    encoder = EncoderConfig(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, mlp_ratio=mlp_ratio, block=block, num_proxy=num_proxy,
                            drop_path=drop_path)
    target = target or ("dvae" if block == "beit" else "hog")
    if target_dim is None:
        target_dim = 8192 if target == "dvae" else hog_dim(patch_size)
    return MaskedImageModel(MIMConfig(encoder, semantic, target, target_dim))


# ------------------------------------------------------------------------------------- serialization

_KINDS = {"mim": (MaskedImageModel, MIMConfig), "mocov3": (MoCoV3, MoCoConfig), "dvae": (DiscreteVAE, DVAEConfig)}


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model described in `path` and load its weights strictly."""
    header = read_model_header(path)
    if header.get("kind") not in _KINDS:
        raise InputError(f"{path}: holds a {header.get('kind')!r}, not a pretraining model ({sorted(_KINDS)})")
    model_cls, config_cls = _KINDS[header["kind"]]
    try:
        config = config_cls.from_dict(header["config"])
    except (InputError, TypeError, KeyError, ValueError, AttributeError) as error:
        raise InputError(f"{path}: the {header['kind']!r} config in its metadata is not one this version builds "
                         f"({_first_line(error)})") from None
    model = model_cls.from_config(config) if model_cls is DiscreteVAE else model_cls(config)
    load_state_strict(model, load_file(str(path), device=str(map_location)), str(path))
    return model


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
