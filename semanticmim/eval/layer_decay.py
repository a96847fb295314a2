"""Layer-wise lr decay for fine-tuning a timm ViT inside a bigger model (classifier, UperNet), one
implementation for every protocol: timm's `param_groups_layer_decay` on BEiT's layer ids.

Ids [BEiT code; the authors' mmpretrain/mmseg configs]: the stem — every prefix token (class token AND
registers, i.e. SemanticMIM's proxies), position and patch embedding, `norm_pre` — is 0; block b
(1-based) is b; everything else (the final norm, `fc_norm`, the head, a decoder) is d + 1. A parameter
with id i gets lr × layer_decay^(d + 1 - i) (the engine's lr schedules multiply each group's
`lr_scale`), so the stem gets layer_decay^(d + 1) and the head 1.

The prefix tokens are grouped explicitly: timm's own ViT matcher only puts `reg_token` in the stem from
timm 1.0.28 on (earlier versions leave the registers — 7 of SemanticMIM's 8 proxies — at the head's
scale), and it puts the final norm in the last block's group (which would lift every layer's lr by one
decay step). Weight decay: none on 1-D parameters (norms, biases, layer scales), tokens and the
position embedding.
"""

from __future__ import annotations

import re

from timm.models._manipulate import MATCH_PREV_GROUP
from timm.optim._param_groups import param_groups_layer_decay
from torch import nn

__all__ = ["PREFIX_TOKENS", "layer_decay_groups", "layer_lr_scales", "vit_group_matcher", "vit_no_weight_decay"]

PREFIX_TOKENS = ("cls_token", "reg_token", "dist_token")
STEM = (*PREFIX_TOKENS, "mask_token", "pos_embed", "patch_embed", "norm_pre")


def vit_group_matcher(vit: nn.Module, prefix: str) -> dict:
    """timm group regexes (matched at a parameter name's start) for the timm ViT `vit`, registered in the
    bigger model under `prefix` (e.g. "encoder." or "backbone.vit."): stem and blocks as the module
    docstring says; names that match neither (final norm, heads, decoder) fall into the top group."""
    own = vit.group_matcher(coarse=False) if hasattr(vit, "group_matcher") else {}
    stem = "|".join([*STEM, *([own["stem"].removeprefix("^")] if isinstance(own.get("stem"), str) else [])])
    blocks = own.get("blocks", [(r"^blocks\.(\d+)", None)])
    blocks = blocks if isinstance(blocks, list) else [(blocks, None)]
    under = re.escape(prefix)
    return {"stem": rf"^{under}(?:{stem})",
            "blocks": [(rf"^{under}(?:{pattern.removeprefix('^')})", suffix) for pattern, suffix in blocks
                       if suffix != MATCH_PREV_GROUP]}


def vit_no_weight_decay(vit: nn.Module, prefix: str) -> set[str]:
    """Names (under `prefix`) of the ViT's non-1-D parameters that take no weight decay: its own list
    (timm's `no_weight_decay`) and every prefix token and position embedding, whatever the timm version."""
    own = set(vit.no_weight_decay()) if hasattr(vit, "no_weight_decay") else set()
    return {f"{prefix}{name}" for name in own | {*PREFIX_TOKENS, "pos_embed"}}


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW parameter groups with `lr_scale` and `weight_decay` for `model`, which names its ViT's
    layers with `group_matcher()` (`vit_group_matcher`) and its no-decay parameters with
    `no_weight_decay()` (`vit_no_weight_decay`)."""
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)


def layer_lr_scales(depth: int, layer_decay: float) -> dict[str, float]:
    """The lr scale of each layer of a `depth`-block ViT under `layer_decay` (for run.json)."""
    return {"stem": layer_decay ** (depth + 1),
            **{f"block{b}": layer_decay ** (depth + 1 - b) for b in range(1, depth + 1)},
            "top": 1.0}
