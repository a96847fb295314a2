"""Masked image modeling: the BEiT/MaskFeat baseline and SemanticMIM's proxy bottleneck.

Baseline (one stream, full self-attention through every block):

    [PROXY, IMG, MASK] -> Block_1 .. Block_L -> norm -> MASK outputs -> head

SemanticMIM (per depth i, same depth for both branches):

    compression:     [PROXY; IMG] <- Block_i([PROXY; IMG])                  never sees MASK
    reconstruction:  MASK <- XBlock_i(q = MASK, kv = [PROXY after step 1; MASK])
    after depth L:   norm -> MASK outputs -> head

MASK reaches image content only through the K proxies. The cross blocks, mask token and head are
discarded after pretraining; what remains is `encoder`, a standard ViT with K prefix tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from semanticmim.errors import InputError
from semanticmim.models.layers import CrossBlock
from semanticmim.models.vit import EncoderConfig, ProxyViT, init_weights, rescale_block_outputs

TARGETS = ("dvae", "hog")


@dataclass(frozen=True)
class MIMConfig:
    """A pretraining model: encoder shape, baseline or SemanticMIM, and the target it predicts."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    semantic: bool = False
    target: str = "dvae"  # "dvae": BEiT's visual tokens (cross-entropy); "hog": MaskFeat's HOG (MSE)
    target_dim: int = 8192  # dVAE vocabulary size, or HOG values per patch

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise InputError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target_dim < 1:
            raise InputError(f"target_dim must be >= 1, got {self.target_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> MIMConfig:
        return cls(**{**values, "encoder": EncoderConfig(**values["encoder"])})


def gather_tokens(tokens: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """tokens: (B, N, D), selected: (B, N) bool with equal counts per row -> (B, S, D) in raster order."""
    counts = selected.sum(dim=1)
    if selected.shape != tokens.shape[:2] or selected.dtype != torch.bool:
        raise InputError(f"masks must be bool of shape {tuple(tokens.shape[:2])}, got {selected.dtype} "
                         f"{tuple(selected.shape)}")
    if bool((counts != counts[0]).any()):
        raise InputError(f"masks must select the same number of patches in every row, got {counts.tolist()}")
    return tokens[selected].view(tokens.shape[0], -1, tokens.shape[2])


class MaskedImageModel(nn.Module):
    """Encoder + mask token (+ SemanticMIM cross blocks) + linear prediction head."""

    checkpoint_kind = "mim"  # the name `load_model` rebuilds it from

    def __init__(self, config: MIMConfig) -> None:
        super().__init__()
        self.config = config
        enc = config.encoder
        self.encoder = ProxyViT(enc)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
        self.cross_blocks = None
        if config.semantic:
            drop_path_rates = torch.linspace(0, enc.drop_path, enc.depth).tolist()
            self.cross_blocks = nn.ModuleList(
                CrossBlock(enc.embed_dim, enc.num_heads, enc.block, enc.mlp_ratio, rate, enc.layer_scale_init)
                for rate in drop_path_rates
            )
        self.head = nn.Linear(enc.embed_dim, config.target_dim)
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.mask_token, std=0.02)
        self.head.apply(init_weights)
        if self.cross_blocks is not None:
            self.cross_blocks.apply(init_weights)
            if self.config.encoder.block == "beit":
                rescale_block_outputs(self.cross_blocks)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    # ------------------------------------------------------------------------------------ pretraining

    def forward_pretrain(self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W); visible, masked: (B, N) bool -> MASK outputs (B, M, D).

        Outputs are in raster order of the masked positions, after the final norm, before the head.
        """
        proxies, patches, patch_pos = self.encoder.embed(images)
        img = gather_tokens(patches, visible)
        mask = self.mask_token + gather_tokens(patch_pos.expand(images.shape[0], -1, -1), masked)
        if masked.shape[1] and not mask.shape[1]:
            raise InputError("masked selects no patch; at least one patch must be predicted")
        if self.cross_blocks is None:
            x = torch.cat([proxies, img, mask], dim=1)
            for block in self.encoder.blocks:
                x = block(x)
            return self.encoder.norm(x[:, -mask.shape[1] :])
        x = torch.cat([proxies, img], dim=1)
        for block, cross_block in zip(self.encoder.blocks, self.cross_blocks, strict=True):
            x = block(x)
            mask = cross_block(x[:, : self.encoder.num_proxy], mask)
        return self.encoder.norm(mask)

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """pred: (B, M, C) head outputs; target: (B, N) token ids ("dvae") or (B, N, C) HOG ("hog");
        masked: (B, N) bool -> scalar loss over the masked positions (fp32)."""
        target = target[masked].view(*pred.shape[:2], *target.shape[2:])
        if self.config.target == "dvae":
            return F.cross_entropy(pred.flatten(0, 1).float(), target.flatten())
        return F.mse_loss(pred.float(), target.float())

    def forward(
        self, images: torch.Tensor, visible: torch.Tensor, masked: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """One pretraining step's loss. Shapes as in `forward_pretrain` and `forward_loss`."""
        return self.forward_loss(self.head(self.forward_pretrain(images, visible, masked)), target, masked)

    # ------------------------------------------------------------- the encoder's API, for convenience

    def forward_features(self, images: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        return self.encoder.forward_features(images, layer)

    def attention(self, images: torch.Tensor, layer: int) -> torch.Tensor:
        return self.encoder.attention(images, layer)
