"""Building, saving and loading models. A saved model is one self-describing safetensors file: the
weights plus, in its metadata, the model kind and config (nanoGPT's `model_args`, as JSON)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from semanticmim.errors import InputError
from semanticmim.models.mim import MaskedImageModel, MIMConfig
from semanticmim.models.mocov3 import MoCoConfig, MoCoV3
from semanticmim.models.vit import EncoderConfig
from semanticmim.targets.dvae import DiscreteVAE, DVAEConfig

METADATA_KEY = "semanticmim"


@dataclass(frozen=True)
class Variant:
    """A pretraining method. `num_proxy` and `mask_ratio` are the paper's defaults (§4.1: baselines
    r=0.4 with one [CLS]; SemanticMIM r=0.6 with K=8 for both BEiT and MaskFeat)."""

    block: str
    semantic: bool
    target: str | None  # None: contrastive (MoCo v3)
    num_proxy: int
    mask_ratio: float | None


VARIANTS: dict[str, Variant] = {
    "beit": Variant("beit", False, "dvae", 1, 0.4),
    "beit-semanticmim": Variant("beit", True, "dvae", 8, 0.6),
    "maskfeat": Variant("vit", False, "hog", 1, 0.4),
    "maskfeat-semanticmim": Variant("vit", True, "hog", 8, 0.6),
    "mocov3": Variant("vit", False, None, 1, None),
}


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
    """The public constructor (DESIGN §6). `target` defaults to the block style's method: "dvae"
    (8192 tokens) for "beit", "hog" (3·9·(p/cell)² values, cell = p/2) for "vit"."""
    encoder = EncoderConfig(block, num_proxy, img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, drop_path)
    target = target or ("dvae" if block == "beit" else "hog")
    if target_dim is None:
        target_dim = 8192 if target == "dvae" else hog_dim(patch_size)
    return MaskedImageModel(MIMConfig(encoder, semantic, target, target_dim))


def build_variant(
    variant: str, encoder: EncoderConfig, num_proxy: int | None = None, target_dim: int | None = None
) -> nn.Module:
    """A named method (`VARIANTS`) on the given encoder shape. The block style is the variant's; K is
    `num_proxy`, or the variant's paper default when None."""
    if variant not in VARIANTS:
        raise InputError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    spec = VARIANTS[variant]
    num_proxy = spec.num_proxy if num_proxy is None else num_proxy
    encoder = EncoderConfig(**{**encoder.to_dict(), "block": spec.block, "num_proxy": num_proxy})
    if spec.target is None:
        return MoCoV3(MoCoConfig(encoder=encoder))
    if target_dim is None:
        target_dim = 8192 if spec.target == "dvae" else hog_dim(encoder.patch_size)
    return MaskedImageModel(MIMConfig(encoder, spec.semantic, spec.target, target_dim))


# ------------------------------------------------------------------------------------- serialization

_KINDS = {"mim": (MaskedImageModel, MIMConfig), "mocov3": (MoCoV3, MoCoConfig), "dvae": (DiscreteVAE, DVAEConfig)}


def model_kind(model: nn.Module) -> str:
    """The registry name of a model `load_model` can rebuild, else its class name (weights only)."""
    for kind, (cls, _) in _KINDS.items():
        if isinstance(model, cls):
            return kind
    return type(model).__name__


def model_config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def model_metadata(model: nn.Module) -> dict[str, str]:
    return {METADATA_KEY: json.dumps({"kind": model_kind(model), "config": model_config(model)})}


def save_model(model: nn.Module, path: str | Path) -> None:
    """Write weights + config to `path` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(tmp), metadata=model_metadata(model))
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
    return json.loads(metadata[METADATA_KEY])


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model described in `path` and load its weights strictly."""
    header = read_model_header(path)
    if header.get("kind") not in _KINDS:
        raise InputError(f"{path}: holds a {header.get('kind')!r}, not a pretraining model ({sorted(_KINDS)})")
    model_cls, config_cls = _KINDS[header["kind"]]
    config = config_cls.from_dict(header["config"])
    model = model_cls.from_config(config) if model_cls is DiscreteVAE else model_cls(config)
    load_state_strict(model, load_file(str(path), device=str(map_location)), str(path))
    return model


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
