"""Export an encoder to timm: the K proxies become timm's prefix tokens (1 cls + K-1 register tokens).

`timm.create_model(config["architecture"], pretrained=False, num_classes=0, **config["kwargs"])` then
loads `model.safetensors` with `strict=True` and its `forward_features` equals ours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from semanticmim.errors import InputError
from semanticmim.models.factory import load_model
from semanticmim.models.vit import ProxyViT
from semanticmim.serialization import model_kind

_TIMM_NAMES = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
               1024: "vit_large_patch16_224"}


def timm_config(encoder: ProxyViT) -> dict:
    """`{"architecture", "kwargs"}` for timm's VisionTransformer; kwargs state every shape explicitly."""
    c = encoder.config
    kwargs = dict(
        img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
        num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True, class_token=True,
        reg_tokens=c.num_proxy - 1, global_pool="token", dynamic_img_size=True,
    )
    if c.block == "beit":
        kwargs["init_values"] = c.layer_scale_init
    return {"architecture": _TIMM_NAMES.get(c.embed_dim, "vit_base_patch16_224"), "kwargs": kwargs}


def timm_state_dict(encoder: ProxyViT) -> dict[str, torch.Tensor]:
    """Our encoder's weights under timm's names. BEiT's q/v biases become `qkv.bias = [b_q, 0, b_v]`
    (a k bias shifts each query's logits by a constant, which softmax ignores)."""
    state = {}
    for name, tensor in encoder.state_dict().items():
        if name.endswith((".attn.q_bias", ".attn.v_bias")):
            continue
        if name == "proxy_tokens":
            state["cls_token"] = tensor[:, :1]
            if tensor.shape[1] > 1:
                state["reg_token"] = tensor[:, 1:]
            continue
        state[name] = tensor
    for i, block in enumerate(encoder.blocks):
        if block.attn.q_bias is not None:
            q_bias, v_bias = block.attn.q_bias.detach(), block.attn.v_bias.detach()
            state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])
    return {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}


def export_timm(checkpoint: str | Path, out_dir: str | Path) -> dict:
    """Write `out_dir/model.safetensors` + `out_dir/config.json` for the encoder of a saved model."""
    model = load_model(checkpoint)
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, ProxyViT):
        raise InputError(f"{checkpoint}: holds a {model_kind(model)!r} model, which has no ViT encoder to export; "
                         "expected a pretraining model (MIM or MoCo v3) written by `semanticmim pretrain`")
    return write_timm_export(encoder, out_dir)


def write_timm_export(encoder: ProxyViT, out_dir: str | Path) -> dict:
    """Write `out_dir/model.safetensors` + `out_dir/config.json` for an encoder in memory (each file
    appears whole: written under a temporary name, then renamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = timm_config(encoder)
    tmp_weights, tmp_config = out_dir / ".model.safetensors.tmp", out_dir / ".config.json.tmp"
    save_file(timm_state_dict(encoder), str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_weights, out_dir / "model.safetensors")
    os.replace(tmp_config, out_dir / "config.json")
    return config
