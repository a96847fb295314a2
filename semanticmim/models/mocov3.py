"""MoCo v3 (Chen et al., 2021), the contrastive baseline of the comparison figures.

A ViT (K=1, its [CLS] token is the image embedding) + 3-layer projector + 2-layer predictor, and a
momentum copy of encoder and projector. Loss: symmetric InfoNCE between the predictor output of one
view and the momentum projection of the other, scaled by 2τ as in the official code.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from semanticmim.errors import InputError
from semanticmim.models.vit import EncoderConfig, ProxyViT


@dataclass(frozen=True)
class MoCoConfig:
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(block="vit", num_proxy=1))
    mlp_dim: int = 4096
    out_dim: int = 256
    temperature: float = 0.2
    freeze_patch_embed: bool = True  # MoCo v3's stability trick: a fixed random patch projection

    def __post_init__(self) -> None:
        if self.encoder.num_proxy != 1:
            raise InputError(f"MoCo v3 uses one [CLS] token, got num_proxy={self.encoder.num_proxy}")
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MoCoConfig:
        return cls(**{**values, "encoder": EncoderConfig(**values["encoder"])})


def build_mlp(num_layers: int, in_dim: int, mlp_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's MLP: Linear (no bias) + BN + ReLU between layers; optional affine-free BN at the end."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in, dim_out = in_dim if i == 0 else mlp_dim, out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


def momentum_at(step: int, total_steps: int, base_momentum: float = 0.99) -> float:
    """Cosine schedule from `base_momentum` at step 0 to 1 at the last step (MoCo v3, BYOL)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1))) * (1.0 - base_momentum)


@torch.no_grad()
def gather_from_all_ranks(x: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (world * B, C); identity outside torch.distributed. No gradient flows through it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered)


class MoCoV3(nn.Module):
    def __init__(self, config: MoCoConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.encoder.embed_dim
        self.encoder = ProxyViT(config.encoder)
        if config.freeze_patch_embed:
            self.encoder.patch_embed.requires_grad_(False)
        self.projector = build_mlp(3, dim, config.mlp_dim, config.out_dim, last_bn=True)
        self.predictor = build_mlp(2, config.out_dim, config.mlp_dim, config.out_dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def online_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def momentum_parameters(self) -> list[nn.Parameter]:
        return [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        """momentum_params <- m * momentum_params + (1 - m) * online_params."""
        torch._foreach_lerp_(self.momentum_parameters(), self.online_parameters(), 1.0 - momentum)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) -> [CLS] embeddings after the final norm (B, D)."""
        return self.encoder.forward_features(images)[:, 0]

    def contrastive_loss(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """query, key: (B, C) -> InfoNCE against the keys of every rank, scaled by 2τ."""
        query, key = F.normalize(query, dim=1), gather_from_all_ranks(F.normalize(key, dim=1))
        logits = query @ key.T / self.config.temperature
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        labels = torch.arange(query.shape[0], device=query.device) + rank * query.shape[0]
        return F.cross_entropy(logits.float(), labels) * (2 * self.config.temperature)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, momentum: float) -> torch.Tensor:
        """view1, view2: (B, 3, H, W) two augmentations of the same images -> symmetric loss."""
        query1 = self.predictor(self.projector(self.embed(view1)))
        query2 = self.predictor(self.projector(self.embed(view2)))
        with torch.no_grad():
            self.update_momentum(momentum)
            key1 = self.momentum_projector(self.momentum_encoder.forward_features(view1)[:, 0])
            key2 = self.momentum_projector(self.momentum_encoder.forward_features(view2)[:, 0])
        return self.contrastive_loss(query1, key2) + self.contrastive_loss(query2, key1)

    # ------------------------------------------------------------- the encoder's API, for convenience

    def forward_features(self, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return self.encoder.forward_features(images, layer)

    def attention(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        return self.encoder.attention(images, layer)
