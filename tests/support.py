"""Helpers shared by the tests (imported as `support`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch

from semanticmim.methods import build_variant
from semanticmim.models import EncoderConfig, save_model
from semanticmim.models.export import export_timm

REPO = Path(__file__).resolve().parents[1]
PROFILES = [REPO / "params.yaml", *(REPO / "params" / name for name in ("smoke.yaml", "mini.yaml", "paper.yaml"))]


def export_tiny_encoder(folder: Path, variant: str = "maskfeat-semanticmim", depth: int = 3, num_proxy: int = 2,
                        seed: int = 0) -> Path:
    """A random-init 32-px, patch-8, 32-d encoder with K proxies, exported to timm format in folder/encoder."""
    torch.manual_seed(seed)
    config = EncoderConfig(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2)
    save_model(build_variant(variant, config, num_proxy=num_proxy, target_dim=16), folder / "model.safetensors")
    export_timm(folder / "model.safetensors", folder / "encoder")
    return folder / "encoder"
