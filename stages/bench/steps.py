"""`semanticmim bench`: training-step speed of every variant against timm's ViT, in one run.

Each record: `step_ms` (forward + backward + AdamW step, model only: inputs and targets are made
before timing), `img_per_s`, `flops_per_step` (counted by torch's FlopCounterMode), `achieved_flops`,
and `peak_flops`, the matmul throughput measured on the same device in the same run, so `mfu` and every
ratio compare numbers taken under the same conditions. Variants are timed round-robin and the median
round is kept, which cancels most drift from other load on the machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from semanticmim.engine.optim import build_adamw
from semanticmim.errors import InputError
from semanticmim.methods import METHODS, build_variant, method, resolve_recipe
from semanticmim.models import EncoderConfig, MaskGenerator
from semanticmim.models.factory import hog_dim

PRESETS: dict[str, EncoderConfig] = {
    "tiny": EncoderConfig(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "vit-b": EncoderConfig(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
DEFAULT_BATCH = {("tiny", "cpu"): 64, ("tiny", "cuda"): 512, ("vit-b", "cpu"): 8, ("vit-b", "cuda"): 128}
BASELINE_OF = {"beit-semanticmim": "beit", "maskfeat-semanticmim": "maskfeat"}


@dataclass
class Workload:
    """A model, its optimizer, and a closure that computes one step's loss on prepared inputs."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[], torch.Tensor]


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best achieved FLOP/s of a large square matmul on `device` (the run's own roofline)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(8):
            a @ b
        synchronize(device)
        best = max(best, 8 * 2 * n**3 / (time.perf_counter() - start))
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The engine's optimizer (fused AdamW with its no-decay groups) for every workload alike."""
    return build_adamw(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, device=device)


def mim_workload(variant: str, encoder: EncoderConfig, batch: int, device: torch.device) -> Workload:
    model = build_variant(variant, encoder).to(device).train()
    images = torch.randn(batch, 3, encoder.img_size, encoder.img_size, device=device)
    visible, masked = MaskGenerator(encoder.num_patches, resolve_recipe(variant).mask_ratio)(batch)
    visible, masked = visible.to(device), masked.to(device)
    target_dim = model.config.target_dim
    tokens = method(variant).target == "dvae"
    target = (torch.randint(0, target_dim, (batch, encoder.num_patches), device=device) if tokens
              else torch.randn(batch, encoder.num_patches, target_dim, device=device))
    return Workload(variant, model, make_optimizer(model, device), lambda: model(images, visible, masked, target))


def contrastive_workload(variant: str, encoder: EncoderConfig, batch: int, device: torch.device) -> Workload:
    model = build_variant(variant, encoder).to(device).train()
    view1 = torch.randn(batch, 3, encoder.img_size, encoder.img_size, device=device)
    view2 = torch.randn_like(view1)
    return Workload(variant, model, make_optimizer(model, device), lambda: model(view1, view2, momentum=0.99))


def timm_workload(encoder: EncoderConfig, batch: int, device: torch.device) -> Workload:
    """timm's ViT over all K+N tokens with a HOG-sized head on the patch tokens: the reference for our
    full-token baseline (MaskFeat: 1 + N tokens through the same blocks)."""
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=encoder.img_size,
                            patch_size=encoder.patch_size, embed_dim=encoder.embed_dim, depth=encoder.depth,
                            num_heads=encoder.num_heads, mlp_ratio=encoder.mlp_ratio)
    dim = hog_dim(encoder.patch_size)
    model = nn.ModuleDict({"vit": vit, "head": nn.Linear(encoder.embed_dim, dim)}).to(device).train()
    images = torch.randn(batch, 3, encoder.img_size, encoder.img_size, device=device)
    target = torch.randn(batch, encoder.num_patches, dim, device=device)

    def loss() -> torch.Tensor:
        tokens = model["vit"].forward_features(images)[:, model["vit"].num_prefix_tokens :]
        return nn.functional.mse_loss(model["head"](tokens).float(), target)

    return Workload("timm-vit", model, make_optimizer(model, device), loss)


def train_step(work: Workload, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = work.loss()
    loss.backward()
    work.optimizer.step()
    work.optimizer.zero_grad(set_to_none=True)


def count_step_flops(work: Workload, device: torch.device) -> int:
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = work.loss()
        loss.backward()
    work.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_steps(work: Workload, device: torch.device, steps: int) -> float:
    """Mean seconds per training step over `steps` steps."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(work, device)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def build_workloads(variants: list[str], encoder: EncoderConfig, batch: int, device: torch.device) -> list[Workload]:
    workloads = []
    for name in variants:
        torch.manual_seed(0)
        if name == "timm-vit":
            workloads.append(timm_workload(encoder, batch, device))
        elif method(name).masks:
            workloads.append(mim_workload(name, encoder, batch, device))
        else:
            workloads.append(contrastive_workload(name, encoder, batch, device))
    return workloads


def run_benchmark(
    device: str = "cpu",
    preset: str = "tiny",
    batch_size: int | None = None,
    steps: int = 3,
    rounds: int = 3,
    variants: list[str] | None = None,
) -> list[dict]:
    """Time every variant (and timm's ViT) on `device`; one record per variant, with ratios."""
    if preset not in PRESETS:
        raise InputError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if device not in ("cpu", "cuda"):
        raise InputError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch.cuda.is_available() is False")
    names = variants or [*METHODS, "timm-vit"]
    unknown = sorted(set(names) - {*METHODS, "timm-vit"})
    if unknown:
        raise InputError(f"unknown variants {unknown}; expected some of {[*METHODS, 'timm-vit']}")
    torch_device = torch.device(device)
    encoder = PRESETS[preset]
    batch = batch_size or DEFAULT_BATCH[(preset, device)]
    workloads = build_workloads(names, encoder, batch, torch_device)
    flops = {work.name: count_step_flops(work, torch_device) for work in workloads}
    for work in workloads:  # warm-up: allocator, kernels, optimizer state
        time_steps(work, torch_device, 1)
    seconds: dict[str, list[float]] = {work.name: [] for work in workloads}
    for _ in range(rounds):
        for work in workloads:
            seconds[work.name].append(time_steps(work, torch_device, steps))
    peak = measure_matmul_peak(torch_device, torch.bfloat16 if device == "cuda" else torch.float32)
    return make_records(seconds, flops, peak, batch, preset, device)


def make_records(seconds: dict[str, list[float]], flops: dict[str, int], peak: float, batch: int,
                 preset: str, device: str) -> list[dict]:
    records = []
    step = {name: statistics.median(values) for name, values in seconds.items()}
    for name, step_s in step.items():
        record = {
            "variant": name, "device": device, "preset": preset, "batch_size": batch,
            "step_ms": round(step_s * 1e3, 3), "img_per_s": round(batch / step_s, 2),
            "flops_per_step": flops[name], "achieved_flops": flops[name] / step_s, "peak_flops": peak,
            "mfu": round(flops[name] / step_s / peak, 4),
        }
        if "timm-vit" in step:
            record["img_per_s_vs_timm"] = round(step["timm-vit"] / step_s, 3)
        if BASELINE_OF.get(name) in step:
            record["step_vs_baseline"] = round(step_s / step[BASELINE_OF[name]], 3)
        records.append(record)
    return records
