"""UperNet on a plain ViT (BEiT's semantic-segmentation code on mmseg, used by the paper's Table 4).

- `ViTPyramid`: the patch tokens of four blocks (paper: 4/6/8/12) as maps, turned into a four-level
  pyramid of strides p/4, p/2, p, 2p (4, 8, 16, 32 at p=16): two 2x2 stride-2 deconvs (with BN + GELU
  between them), one deconv, identity, 2x2 max-pool.
- `UperHead`: mmseg's UPerHead — a pyramid pooling module (bins 1/2/3/6) on the coarsest level, 1x1
  lateral convs, a top-down path, 3x3 FPN convs, all levels upsampled to the finest and fused by a 3x3
  conv, dropout 0.1, 1x1 classifier; every conv is conv-BN-ReLU with `channels` (768) outputs.
- `FCNHead`: the auxiliary head on the third level (block 8, stride p): one 3x3 conv-BN-ReLU with 256
  channels, dropout 0.1, 1x1 classifier; its loss weighs 0.4.

Written here rather than taken from segmentation_models_pytorch: its UPerNetDecoder follows another
design (reduced PPM branches, its own fusion) and is built around its CNN encoders; these ~100 lines
follow mmseg's module structure and channel counts, which tests check against the spec.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from semanticmim.eval.layer_decay import vit_group_matcher, vit_no_weight_decay

__all__ = ["FCNHead", "UperHead", "UperNetSegmenter", "ViTPyramid", "conv_bn_relu"]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmcv's ConvModule with BN and ReLU: the conv has no bias (BN follows), 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def upsample_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


class ViTPyramid(nn.Module):
    """images (B, 3, H, W) -> four maps (B, D, H/s, W/s) at strides s = p/4, p/2, p, 2p, from the patch
    tokens of `blocks` (1-based, before the final norm) of a timm ViT (`vit`, with prefix tokens dropped)."""

    def __init__(self, vit: nn.Module, blocks: tuple[int, int, int, int]):
        super().__init__()
        self.blocks = tuple(blocks)
        vit.prune_intermediate_layers(sorted({b - 1 for b in blocks}), prune_norm=True, prune_head=True)
        self.vit = vit  # blocks after the last one used are dropped: no unused parameters under DDP
        dim = vit.embed_dim
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        unique = sorted(set(self.blocks))
        maps = self.vit.forward_intermediates(
            images, indices=[b - 1 for b in unique], norm=False, output_fmt="NCHW", intermediates_only=True
        )
        by_block = dict(zip(unique, maps, strict=True))
        levels = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        return [level(by_block[block]) for level, block in zip(levels, self.blocks, strict=True)]


class PyramidPooling(nn.Module):
    """PSPNet's PPM: per bin b, adaptive average pool to b x b, 1x1 conv-BN-ReLU, upsample back."""

    def __init__(self, in_channels: int, channels: int, bins: tuple[int, ...]):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, channels, 1)) for b in bins
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [upsample_to(stage(x), x) for stage in self.stages]


class UperHead(nn.Module):
    """levels: four maps of `in_channels`, finest first -> logits (B, classes, h0, w0) at the finest stride."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        bins: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        num_levels: int = 4,
    ):
        super().__init__()
        self.psp = PyramidPooling(in_channels, channels, bins)
        self.bottleneck = conv_bn_relu(in_channels + len(bins) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in range(num_levels - 1))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(num_levels - 1))
        self.fpn_bottleneck = conv_bn_relu(num_levels * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        top = levels[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, levels, strict=False)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: add each coarser level to the next finer one
            laterals[i - 1] = laterals[i - 1] + upsample_to(laterals[i], laterals[i - 1])
        outputs = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=False)] + [laterals[-1]]
        fused = torch.cat([outputs[0], *(upsample_to(x, outputs[0]) for x in outputs[1:])], dim=1)
        return self.classifier(self.dropout(self.fpn_bottleneck(fused)))


class FCNHead(nn.Module):
    """x (B, in_channels, h, w) -> logits (B, classes, h, w): `num_convs` 3x3 conv-BN-ReLU, dropout, 1x1."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(conv_bn_relu(a, b, 3) for a, b in itertools.pairwise(widths)))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


class UperNetSegmenter(nn.Module):
    """images (B, 3, H, W) -> (logits (B, C, H/(p/4), W/(p/4)), auxiliary logits (B, C, H/p, W/p))."""

    def __init__(self, backbone: ViTPyramid, decode_head: UperHead, auxiliary_head: FCNHead, aux_level: int = 2):
        super().__init__()
        self.backbone, self.decode_head, self.auxiliary_head = backbone, decode_head, auxiliary_head
        self.aux_level = aux_level

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.backbone(images)
        return self.decode_head(levels), self.auxiliary_head(levels[self.aux_level])

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The decode head's logits only (inference does not run the auxiliary head)."""
        return self.decode_head(self.backbone(images))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for layer-wise lr decay: the ViT's stem and blocks; pyramid and heads on top."""
        return vit_group_matcher(self.backbone.vit, "backbone.vit.")

    def no_weight_decay(self) -> set[str]:
        return vit_no_weight_decay(self.backbone.vit, "backbone.vit.")
