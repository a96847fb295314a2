"""CUDA checks (run on a GPU host; skipped elsewhere): the same numbers on the GPU as on the CPU,
bf16 autocast close to fp32, fused AdamW steps, and the benchmark at ViT-B/16."""

from __future__ import annotations

import pytest
import torch

from semanticmim.data.transforms import normalize
from semanticmim.methods import METHODS, build_variant
from semanticmim.models import EncoderConfig, MaskGenerator
from semanticmim.targets import HOGTarget
from stages.bench.steps import run_benchmark

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = EncoderConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


@pytest.mark.parametrize("variant", [v for v in METHODS if v != "mocov3"])
def test_pretrain_forward_matches_cpu_and_bf16_is_close(variant):
    torch.manual_seed(0)
    model = build_variant(variant, TINY, target_dim=64 if variant.startswith("beit") else None).eval()
    images = torch.randn(4, 3, 32, 32)
    visible, masked = MaskGenerator(16, 0.5)(4, torch.Generator().manual_seed(0))
    cpu = model.forward_pretrain(images, visible, masked)
    model.cuda()
    args = images.cuda(), visible.cuda(), masked.cuda()
    torch.testing.assert_close(model.forward_pretrain(*args).cpu(), cpu, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model.forward_pretrain(*args).float().cpu()
    assert (bf16 - cpu).abs().mean() < 0.05


def test_hog_target_on_cuda_matches_cpu():
    images = torch.randn(2, 3, 64, 64)
    hog = HOGTarget()
    torch.testing.assert_close(hog.cuda()(images.cuda()).cpu(), hog.cpu()(images), rtol=1e-4, atol=1e-4)


def test_bench_vit_b_on_cuda_reports_every_variant():
    records = run_benchmark("cuda", "vit-b", batch_size=32, steps=2, rounds=1)
    names = {r["variant"] for r in records}
    assert names == {*METHODS, "timm-vit"}
    assert all(0 < r["mfu"] < 1.2 for r in records)


def test_uint8_batches_are_normalised_on_the_device_as_on_the_cpu():
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    on_device = normalize(pixels.cuda())
    assert on_device.device.type == "cuda"
    torch.testing.assert_close(on_device.cpu(), normalize(pixels))
