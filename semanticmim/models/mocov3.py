"""MoCo v3 (Chen et al., 2021), the contrastive baseline of the comparison figures.

A ViT (K=1, its [CLS] token is the image embedding) + 3-layer projector + 2-layer predictor, both
ending in an affine-free BatchNorm as in the official ViT builder, and a momentum copy of encoder and
projector. Loss: symmetric InfoNCE between the predictor output of one view and the momentum
projection of the other, scaled by 2τ as in the official code.

The momentum update runs once per optimizer step, before that step's first forward: the engine calls
`before_step(step, total_steps, base_momentum)` (or `update_momentum(momentum_at(...))`) on the
unwrapped module. Without gradient accumulation this is the official order (update, then keys, in
every iteration). With accumulation A the update still runs once per step, but the negatives of
each query are the keys of its own micro-batch (gathered over ranks), not of the whole step's batch.

BatchNorm: `convert_sync_batchnorm` makes the projector/predictor BNs SyncBatchNorm under DDP on CUDA,
as the official code does; on CPU (gloo) SyncBatchNorm is not supported, so BN statistics stay per rank.
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


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Every BatchNorm of `model` (MoCo v3: projector, predictor, momentum projector) as SyncBatchNorm
    when torch.distributed is initialised and `device` is CUDA, as the official code does before DDP;
    otherwise `model` unchanged: on CPU gloo has no SyncBatchNorm, so statistics are per rank there.
    Call it before wrapping in DDP and before building the optimizer. -> the (possibly new) module."""
    if torch.device(device).type != "cuda" or not (dist.is_available() and dist.is_initialized()):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


@torch.no_grad()
def gather_from_all_ranks(x: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (world * B, C); identity outside torch.distributed. No gradient flows through it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered)


class MoCoV3(nn.Module):
    checkpoint_kind = "mocov3"  # the name `load_model` rebuilds it from

    def __init__(self, config: MoCoConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.encoder.embed_dim
        self.encoder = ProxyViT(config.encoder)
        if config.freeze_patch_embed:
            self.encoder.patch_embed.requires_grad_(False)
        self.projector = build_mlp(3, dim, config.mlp_dim, config.out_dim, last_bn=True)
        self.predictor = build_mlp(2, config.out_dim, config.mlp_dim, config.out_dim, last_bn=True)
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
        """momentum_params <- m * momentum_params + (1 - m) * online_params (parameters only: BN running
        statistics of the momentum projector follow its own forwards, as in the official code)."""
        targets = self.momentum_parameters()
        scaled_online = torch._foreach_mul(self.online_parameters(), 1.0 - momentum)
        # two products and a sum, rounded as the official formula is (a lerp differs by an ulp)
        torch._foreach_mul_(targets, momentum)
        torch._foreach_add_(targets, scaled_online)

    def before_step(self, step: int, total_steps: int, base_momentum: float = 0.99) -> float:
        """Once per optimizer step, before its first micro-batch's forward: the cosine-scheduled momentum
        update (`momentum_at`). Call it on the unwrapped module under DDP. -> the momentum used."""
        momentum = momentum_at(step, total_steps, base_momentum)
        self.update_momentum(momentum)
        return momentum

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

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, momentum: float | None = None) -> torch.Tensor:
        """view1, view2: (B, 3, H, W) two augmentations of the same images -> symmetric loss (scalar).

        The momentum encoder is not updated here (see `before_step`). momentum: transitional, for
        callers that still update per forward; when given, the update runs here after the queries and
        before the keys, as in the official forward, i.e. once per micro-batch."""
        query1 = self.predictor(self.projector(self.embed(view1)))
        query2 = self.predictor(self.projector(self.embed(view2)))
        with torch.no_grad():
            if momentum is not None:
                self.update_momentum(momentum)
            key1 = self.momentum_projector(self.momentum_encoder.forward_features(view1)[:, 0])
            key2 = self.momentum_projector(self.momentum_encoder.forward_features(view2)[:, 0])
        return self.contrastive_loss(query1, key2) + self.contrastive_loss(query2, key1)

    # ------------------------------------------------------------- the encoder's API, for convenience

    def forward_features(self, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return self.encoder.forward_features(images, layer)

    def attention(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        return self.encoder.attention(images, layer)
