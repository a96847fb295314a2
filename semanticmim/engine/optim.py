"""Optimizer and per-iteration lr schedule (paper Table 2): AdamW without weight decay on norms,
biases (incl. BEiT's q/v biases), layer-scale, tokens and position embeddings; linear warmup, then
cosine to the minimum lr, updated every optimizer step."""

from __future__ import annotations

import torch
from timm.optim._param_groups import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the non-1-D parameters that take no weight decay (tokens, position embeddings)."""
    return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()


def build_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with the fused kernel (on CPU too: 5x faster than the default
    per-tensor loop for ViT-B + cross blocks, which matters since SemanticMIM doubles the parameters)."""
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay_names(model))
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type in ("cpu", "cuda"))


def build_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float
) -> CosineLRScheduler:
    """Linear warmup from 0 over `warmup_steps`, then cosine to `min_lr` at `total_steps` (per step)."""
    warmup_steps = min(warmup_steps, total_steps - 1)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )
