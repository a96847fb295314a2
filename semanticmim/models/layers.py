"""Transformer parts shared by every encoder: attention, the pre-norm block and the cross-attention block.

Parameter names follow timm's VisionTransformer (`norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`, `norm2`,
`mlp.fc1`, `mlp.fc2`, `ls2.gamma`) so that the encoder exports to timm by renaming almost nothing.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)

BLOCK_STYLES = ("beit", "vit")


class Attention(nn.Module):
    """Multi-head attention with a fused qkv projection.

    `qkv_bias="qv"` is BEiT's choice: learned q and v biases and no k bias. A k bias adds `q · b_k` to
    every logit of a query, which softmax cancels, so it is exactly equivalent to a zero k bias; the
    timm export writes `[b_q, 0, b_v]` into timm's single `qkv.bias`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: str = "qkv") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias == "qkv")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, L, D) -> q, k, v: (B, heads, L, head_dim)."""
        bias = self.qkv.bias
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x: torch.Tensor, num_skip_queries: int = 0) -> torch.Tensor:
        """x: (B, L, D) -> (B, L - num_skip_queries, D).

        Every token is a key/value; the first `num_skip_queries` tokens are not queries. With
        `num_skip_queries = K` over `[PROXY; MASK]` this is the reconstruction cross-attention
        `q = MASK, kv = [PROXY; MASK]` in one fused projection.
        """
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q[:, :, num_skip_queries:], k, v)
        return self.proj(out.transpose(1, 2).flatten(2))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> softmax attention probabilities (B, heads, L, L)."""
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block. `style="beit"`: q/v bias, layer-scale; `style="vit"`: qkv bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        style: str,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        init_values: float = 0.1,
    ) -> None:
        super().__init__()
        if style not in BLOCK_STYLES:
            raise ValueError(f"block style {style!r} is not one of {BLOCK_STYLES}")
        layer_scale = style == "beit"
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias="qv" if style == "beit" else "qkv")
        self.ls1 = LayerScale(dim, init_values) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, init_values) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class CrossBlock(Block):
    """SemanticMIM's reconstruction block: `MASK <- MASK + CrossAttn(q=MASK, kv=[PROXY; MASK])`, then MLP.

    Same width, heads and MLP as the compression `Block` of its depth, with its own weights. Pre-norm:
    `norm1` is applied to queries and keys/values alike; the residual is on the MASK queries only.
    """

    def forward(self, proxy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """proxy: (B, K, D) compressed proxies of this depth, mask: (B, M, D) -> updated mask (B, M, D)."""
        kv = self.norm1(torch.cat([proxy, mask], dim=1))
        mask = mask + self.drop_path1(self.ls1(self.attn(kv, num_skip_queries=proxy.shape[1])))
        return mask + self.drop_path2(self.ls2(self.mlp(self.norm2(mask))))
