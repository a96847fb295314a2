"""The encoder: a plain ViT whose prefix holds K learnable [PROXY] tokens (K "cls" tokens).

This is what survives pretraining. It is a standard ViT with K prefix tokens, each with its own slot of
the learned absolute position embedding, in one of two block styles (BEiT or MaskFeat/ViT).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from pydantic import ConfigDict, PositiveFloat, PositiveInt
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from torch import nn

from semanticmim.errors import InputError
from semanticmim.models.layers import BLOCK_STYLES, Block, LayerNorm


@dataclass(frozen=True)
class EncoderShape:
    """The encoder's size (ViT-B/16 at 224 by default): what a profile chooses (params `pretrain.model`,
    which pydantic validates against this dataclass)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    img_size: PositiveInt = 224
    patch_size: PositiveInt = 16
    embed_dim: PositiveInt = 768
    depth: PositiveInt = 12
    num_heads: PositiveInt = 12
    mlp_ratio: PositiveFloat = 4.0

    def __post_init__(self) -> None:
        for name in (shape.name for shape in fields(EncoderShape)):  # the annotations bind pydantic only
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise InputError(f"patch_size {self.patch_size} does not divide img_size {self.img_size}")
        if self.embed_dim % self.num_heads:
            raise InputError(f"num_heads {self.num_heads} does not divide embed_dim {self.embed_dim}")


@dataclass(frozen=True)
class EncoderConfig(EncoderShape):
    """Everything that defines the encoder: its shape plus what the method (block style) and the recipe (K,
    drop path) choose; stored in every checkpoint."""

    block: str = "beit"
    num_proxy: int = 1
    drop_path: float = 0.0
    layer_scale_init: float = 0.1  # BEiT's γ init; unused by the "vit" style

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block not in BLOCK_STYLES:
            raise InputError(f"block must be one of {BLOCK_STYLES}, got {self.block!r}")
        if self.num_proxy < 1:
            raise InputError(f"num_proxy must be >= 1, got {self.num_proxy}")
        if not 0.0 <= self.drop_path < 1.0:
            raise InputError(f"drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def to_dict(self) -> dict:
        return asdict(self)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) for Linear/Conv weights, zero biases, unit LayerNorms (BEiT, MAE, timm)."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def rescale_block_outputs(blocks: nn.ModuleList) -> None:
    """BEiT's init: divide the residual-branch output weights of block l (1-based) by sqrt(2 l)."""
    for layer_id, block in enumerate(blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))


class ProxyViT(nn.Module):
    """ViT encoder with K proxy tokens: tokens are `[PROXY_1..K, IMG_1..N]`."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        dim, num_proxy = config.embed_dim, config.num_proxy
        self.num_proxy = num_proxy
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, 3, dim, strict_img_size=False)
        self.proxy_tokens = nn.Parameter(torch.zeros(1, num_proxy, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_proxy + config.num_patches, dim))
        drop_path_rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.block, config.mlp_ratio, rate, config.layer_scale_init)
            for rate in drop_path_rates
        )
        self.norm = LayerNorm(dim)
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.proxy_tokens, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_weights)
        if self.config.block == "beit":
            rescale_block_outputs(self.blocks)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters that are neither norms nor biases but still take no weight decay (recipe §3)."""
        return {"proxy_tokens", "pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping, which is what layer-wise lr decay needs."""
        return dict(
            stem=r"^proxy_tokens|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    # ---------------------------------------------------------------------------------------- tokens

    def check_images(self, images: torch.Tensor) -> tuple[int, int]:
        """Validate `images: (B, 3, H, W)` and return the patch grid (H/p, W/p)."""
        p = self.config.patch_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[2] % p or images.shape[3] % p:
            raise InputError(f"patch_size {p} does not divide image size {tuple(images.shape[2:])}")
        return images.shape[2] // p, images.shape[3] // p

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embedding (1, K + h*w, D), bicubically resampled when the grid is not the native one."""
        native = (self.config.grid_size, self.config.grid_size)
        if grid == native:
            return self.pos_embed
        # The same function timm uses with dynamic_img_size, so exported models match at any size.
        return resample_abs_pos_embed(self.pos_embed, new_size=grid, old_size=native, num_prefix_tokens=self.num_proxy)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images: (B, 3, H, W) -> proxies (B, K, D), patches (B, N, D), both with position embedding
        added, and the patch position embedding (1, N, D) itself (mask tokens need it)."""
        pos_embed = self.pos_embed_for(self.check_images(images))
        proxy_pos, patch_pos = pos_embed[:, : self.num_proxy], pos_embed[:, self.num_proxy :]
        proxies = (self.proxy_tokens + proxy_pos).expand(images.shape[0], -1, -1)
        return proxies, self.patch_embed(images) + patch_pos, patch_pos

    def check_layer(self, layer: int) -> int:
        depth = len(self.blocks)
        if not 1 <= layer <= depth:
            raise InputError(f"layer must be in 1..{depth} (1-based block index), got {layer}")
        return layer

    # --------------------------------------------------------------------------------------- forward

    def forward_features(self, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """images: (B, 3, H, W) -> tokens (B, K + N, D) after block `layer` (1-based), or after the last
        block and the final norm when `layer` is None."""
        stop = len(self.blocks) if layer is None else self.check_layer(layer)
        proxies, patches, _ = self.embed(images)
        x = torch.cat([proxies, patches], dim=1)
        for block in self.blocks[:stop]:
            x = block(x)
        return self.norm(x) if layer is None else x

    def forward_intermediates(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """images: (B, 3, H, W) -> the tokens (B, K + N, D) after each of `layers` (1-based, no norm)."""
        wanted = {self.check_layer(layer) for layer in layers}
        proxies, patches, _ = self.embed(images)
        x, outputs = torch.cat([proxies, patches], dim=1), {}
        for layer, block in enumerate(self.blocks[: max(wanted)], start=1):
            x = block(x)
            if layer in wanted:
                outputs[layer] = x
        return [outputs[layer] for layer in layers]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)

    def attention(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        """images: (B, 3, H, W) -> softmax attention of block `layer` (1-based): (B, heads, K+N, K+N)."""
        block = self.blocks[self.check_layer(layer) - 1]
        x = self.forward_features(images, layer - 1) if layer > 1 else torch.cat(self.embed(images)[:2], 1)
        return block.attn.attention_probs(block.norm1(x))
