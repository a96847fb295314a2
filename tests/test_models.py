"""Model behaviour: the information flow of both forwards, the exact SemanticMIM block maths, init,
masking, losses and bad arguments. Tiny sizes, parametrized over variants and block styles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from semanticmim.errors import InputError
from semanticmim.methods import METHODS, build_variant
from semanticmim.models import EncoderConfig, MaskGenerator, build_model, num_masked
from semanticmim.models.mocov3 import MoCoV3, momentum_at

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4)
MIM_VARIANTS = [name for name, spec in METHODS.items() if spec.target is not None]


def tiny_model(block: str, semantic: bool, num_proxy: int = 4, **overrides):
    torch.manual_seed(0)
    return build_model(block=block, semantic=semantic, num_proxy=num_proxy, **{**TINY, **overrides}).eval()


def masks(batch: int = 2, ratio: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return MaskGenerator(16, ratio)(batch, torch.Generator().manual_seed(seed))


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def patch_pixels(mask: torch.Tensor, patch: int = 8, grid: int = 4) -> torch.Tensor:
    """(B, N) patch mask -> (B, 1, H, W) pixel mask."""
    return mask.view(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)


# ---------------------------------------------------------------------------------------- every variant


@pytest.mark.parametrize("variant", sorted(METHODS))
def test_every_trainable_parameter_gets_a_finite_gradient(variant):
    torch.manual_seed(0)
    model = build_variant(variant, EncoderConfig(**TINY), num_proxy=2 if variant != "mocov3" else None,
                          target_dim=10 if variant.startswith("beit") else None).train()
    x = images(4)
    if isinstance(model, MoCoV3):
        loss = model(x, x.flip(-1), momentum=0.99)
    else:
        visible, masked = MaskGenerator(16, 0.5)(4)
        target = (torch.randint(0, 10, (4, 16)) if model.config.target == "dvae"
                  else torch.randn(4, 16, model.config.target_dim))
        loss = model(x, visible, masked, target)
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# ------------------------------------------------------------------------------------- information flow


def capture_compression_stream(model) -> tuple[list[torch.Tensor], list]:
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out.clone()))
             for block in model.encoder.blocks]
    return outputs, hooks


@pytest.mark.parametrize("block", ["beit", "vit"])
def test_semantic_img_and_proxy_never_see_mask_tokens(block):
    model = tiny_model(block, semantic=True)
    x, (visible, masked) = images(), masks()
    first, hooks = capture_compression_stream(model)
    out_a = model.forward_pretrain(x, visible, masked)
    with torch.no_grad():
        model.mask_token.add_(5.0)
    other_masked = torch.roll(masked, 1, dims=1)  # different MASK queries, same visible patches
    model.forward_pretrain(x, visible, other_masked)
    for hook in hooks:
        hook.remove()
    depth = len(model.encoder.blocks)
    for before, after in zip(first[:depth], first[depth:], strict=True):
        torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert not torch.allclose(out_a, model.forward_pretrain(x, visible, masked))  # the probe is live


def replace_proxies(model, proxies: list[torch.Tensor]) -> list:
    """Hooks that overwrite the proxy slots of each compression block's output with `proxies`."""
    k = model.encoder.num_proxy

    def hook_for(depth):
        def hook(_module, _inputs, out):
            return torch.cat([proxies[depth][:, :k], out[:, k:]], dim=1)
        return hook

    return [block.register_forward_hook(hook_for(i)) for i, block in enumerate(model.encoder.blocks)]


@pytest.mark.parametrize(("block", "semantic"), [("beit", True), ("vit", True), ("beit", False), ("vit", False)])
def test_mask_outputs_reach_the_image_only_through_the_proxies(block, semantic):
    """Run image B with image A's proxy states injected at every depth: SemanticMIM then predicts
    exactly A's MASK outputs; the baseline does not (its MASK tokens also read IMG tokens)."""
    model = tiny_model(block, semantic)
    (visible, masked), image_a, image_b = masks(), images(seed=1), images(seed=2)
    states_a, hooks = capture_compression_stream(model)
    out_a = model.forward_pretrain(image_a, visible, masked)
    for hook in hooks:
        hook.remove()
    hooks = replace_proxies(model, states_a)
    out_b_with_a_proxies = model.forward_pretrain(image_b, visible, masked)
    for hook in hooks:
        hook.remove()
    if semantic:
        torch.testing.assert_close(out_b_with_a_proxies, out_a, rtol=0, atol=1e-6)
    else:
        assert (out_b_with_a_proxies - out_a).abs().max() > 1e-3


@pytest.mark.parametrize(("block", "semantic"), [("beit", True), ("vit", True), ("beit", False), ("vit", False)])
def test_no_masked_pixel_influences_any_output(block, semantic):
    model = tiny_model(block, semantic)
    x, (visible, masked) = images(), masks()
    noise = torch.randn_like(x) * 10
    out = model.forward_pretrain(x, visible, masked)
    hidden_changed = x + noise * patch_pixels(masked)
    visible_changed = x + noise * patch_pixels(visible)
    torch.testing.assert_close(model.forward_pretrain(hidden_changed, visible, masked), out, rtol=0, atol=0)
    assert (model.forward_pretrain(visible_changed, visible, masked) - out).abs().max() > 1e-5


# ----------------------------------------------------------------------------- exact block arithmetic


def reference_attention(attn, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out by hand from the module's weights."""
    dim, heads = q_in.shape[-1], attn.num_heads
    weight = attn.qkv.weight
    if attn.q_bias is not None:
        bias_q, bias_k, bias_v = attn.q_bias, torch.zeros(dim), attn.v_bias
    else:
        bias_q, bias_k, bias_v = attn.qkv.bias.chunk(3)
    q = F.linear(q_in, weight[:dim], bias_q)
    k = F.linear(kv_in, weight[dim : 2 * dim], bias_k)
    v = F.linear(kv_in, weight[2 * dim :], bias_v)
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(dim // heads)).softmax(-1)
    return attn.proj((probs @ v).transpose(1, 2).flatten(2))


def reference_semantic_forward(model, x, visible, masked):
    enc = model.encoder
    k, grid = enc.num_proxy, enc.config.grid_size
    patches = enc.patch_embed(x) + enc.pos_embed[:, k:]
    img = torch.stack([patches[b, visible[b].nonzero().flatten()] for b in range(x.shape[0])])
    mask = torch.stack([model.mask_token[0, 0] + enc.pos_embed[0, k:][masked[b].nonzero().flatten()]
                        for b in range(x.shape[0])])
    tokens = torch.cat([(enc.proxy_tokens + enc.pos_embed[:, :k]).expand(x.shape[0], -1, -1), img], 1)
    assert grid * grid == visible.shape[1]
    for block, xblock in zip(enc.blocks, model.cross_blocks, strict=True):
        h = block.norm1(tokens)
        tokens = tokens + block.ls1(reference_attention(block.attn, h, h))
        tokens = tokens + block.ls2(block.mlp(block.norm2(tokens)))
        kv = xblock.norm1(torch.cat([tokens[:, :k], mask], 1))
        mask = mask + xblock.ls1(reference_attention(xblock.attn, xblock.norm1(mask), kv))
        mask = mask + xblock.ls2(xblock.mlp(xblock.norm2(mask)))
    return enc.norm(mask)


@pytest.mark.parametrize("block", ["beit", "vit"])
def test_semantic_forward_matches_the_written_out_equations(block):
    model = tiny_model(block, semantic=True, num_proxy=3)
    with torch.no_grad():  # non-trivial biases and layer scales so every term is exercised
        for name, param in model.named_parameters():
            if name.endswith(("bias", "gamma")):
                param.normal_(0, 0.2)
    x, (visible, masked) = images(), masks(ratio=0.4)
    torch.testing.assert_close(model.forward_pretrain(x, visible, masked),
                               reference_semantic_forward(model, x, visible, masked), rtol=1e-5, atol=1e-5)


def test_separate_masks_may_overlap_and_predict_visible_patches():
    model = tiny_model("vit", semantic=True)
    generator = MaskGenerator(16, mask_ratio=0.5, img_mask_ratio=0.25)
    visible, masked = generator(64, torch.Generator().manual_seed(0))
    assert (visible.sum(1) == 12).all() and (masked.sum(1) == 8).all()
    assert (visible & masked).any()
    out = model.forward_pretrain(torch.randn(64, 3, 32, 32), visible, masked)
    assert out.shape == (64, 8, 32) and torch.isfinite(out).all()


# -------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize(("ratio", "count"), [(0.4, 79), (0.6, 118), (0.8, 157)])
def test_mask_counts_are_ceil_of_n_times_ratio(ratio, count):
    visible, masked = MaskGenerator(196, ratio)(8)
    assert (masked.sum(1) == count).all()
    assert not (visible & masked).any() and (visible | masked).all()


def test_masks_are_seeded_and_uniform():
    first = MaskGenerator(16, 0.5)(4, torch.Generator().manual_seed(3))
    again = MaskGenerator(16, 0.5)(4, torch.Generator().manual_seed(3))
    assert torch.equal(first[1], again[1])
    frequency = MaskGenerator(16, 0.25)(4000, torch.Generator().manual_seed(0))[1].float().mean(0)
    assert (frequency - 0.25).abs().max() < 0.04  # every position equally likely to be masked


def test_num_masked_avoids_float_round_up():
    assert num_masked(10, 0.7) == 7 and num_masked(196, 0.4) == 79


# --------------------------------------------------------------------------------------- architecture


def test_beit_block_details():
    model = build_model(block="beit", semantic=True, num_proxy=2, **{**TINY, "embed_dim": 256, "depth": 4})
    for layer_id, block in enumerate(model.encoder.blocks, start=1):
        assert block.attn.qkv.bias is None and block.attn.q_bias is not None and block.attn.v_bias is not None
        assert torch.all(block.ls1.gamma == 0.1) and block.norm1.eps == 1e-6
        # timm's trunc_normal_ cuts at +-2 absolute, so with std 0.02 it is effectively normal(0.02)
        expected = 0.02 / math.sqrt(2 * layer_id)
        assert block.attn.proj.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert block.mlp.fc2.weight.std().item() == pytest.approx(expected, rel=0.1)
    for layer_id, block in enumerate(model.cross_blocks, start=1):
        assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * layer_id), rel=0.1)


def test_vit_block_details():
    model = build_model(block="vit", semantic=False, num_proxy=1, **TINY)
    block = model.encoder.blocks[0]
    assert block.attn.qkv.bias is not None and block.attn.q_bias is None
    assert not hasattr(block.ls1, "gamma")


def test_k_bias_would_not_change_attention():
    """Why BEiT's missing k bias exports exactly to timm's qkv bias with a zero k part."""
    model = tiny_model("vit", semantic=False)
    x = images()
    before = model.forward_features(x)
    with torch.no_grad():
        model.encoder.blocks[0].attn.qkv.bias[32:64].normal_(0, 1.0)
    torch.testing.assert_close(model.forward_features(x), before, rtol=1e-5, atol=1e-5)


def test_features_attention_and_intermediates_agree():
    model = tiny_model("beit", semantic=True, num_proxy=2)
    x = images()
    after_two = model.forward_features(x, layer=2)
    assert torch.equal(model.encoder.forward_intermediates(x, [2])[0], after_two)
    probs = model.attention(x, layer=3)
    assert probs.shape == (2, 4, 18, 18)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 18))
    block = model.encoder.blocks[2]
    manual = block.norm1(after_two)
    out = after_two + block.ls1(block.attn(manual))
    expected = out + block.ls2(block.mlp(block.norm2(out)))
    torch.testing.assert_close(model.forward_features(x, layer=3), expected)


def test_features_at_another_resolution_use_interpolated_pos_embed():
    model = tiny_model("vit", semantic=False)
    features = model.forward_features(torch.randn(1, 3, 64, 48))
    assert features.shape == (1, 4 + 8 * 6, 32) and torch.isfinite(features).all()


# --------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("block", ["beit", "vit"])
def test_loss_reads_only_masked_positions(block):
    model = tiny_model(block, semantic=True, target_dim=12)
    x, (visible, masked) = images(), masks()
    target = torch.randint(0, 12, (2, 16)) if block == "beit" else torch.randn(2, 16, 12)
    loss = model(x, visible, masked, target)
    changed = target.clone()
    changed[visible] = (changed[visible] + 1) % 12 if block == "beit" else changed[visible] + 3
    torch.testing.assert_close(model(x, visible, masked, changed), loss)
    changed[masked] = (changed[masked] + 1) % 12 if block == "beit" else changed[masked] + 3
    assert not torch.allclose(model(x, visible, masked, changed), loss)


# --------------------------------------------------------------------------------------------- MoCo v3


def test_mocov3_momentum_update_and_schedule():
    torch.manual_seed(0)
    model = build_variant("mocov3", EncoderConfig(**TINY))
    with torch.no_grad():
        for param in model.online_parameters():
            param.add_(1.0)
    snapshot = [p.clone() for p in model.momentum_parameters()]
    model.update_momentum(1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.momentum_parameters(), strict=True))
    model.update_momentum(0.75)
    for old, new, online in zip(snapshot, model.momentum_parameters(), model.online_parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * online)
    assert momentum_at(0, 100) == pytest.approx(0.99) and momentum_at(100, 100) == pytest.approx(1.0)
    assert not model.encoder.patch_embed.proj.weight.requires_grad


def test_mocov3_loss_prefers_matching_pairs():
    torch.manual_seed(0)
    model = build_variant("mocov3", EncoderConfig(**TINY))
    keys = torch.randn(8, 256)
    matched = model.contrastive_loss(keys + 0.01 * torch.randn(8, 256), keys)
    shuffled = model.contrastive_loss(keys[torch.randperm(8)], keys)
    assert matched < 0.1 < shuffled


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(img_size=30, patch_size=8), "patch_size 8 does not divide img_size 30"),
        (dict(num_proxy=0), "num_proxy must be >= 1"),
        (dict(block="resnet"), "block must be one of"),
        (dict(embed_dim=30, num_heads=4), "num_heads 4 does not divide embed_dim 30"),
    ],
)
def test_bad_model_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(InputError, match=message) as error:
        build_model(**{**TINY, "block": "vit", **kwargs})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval(ratio):
    with pytest.raises(InputError, match="mask ratio must be in \\(0, 1\\)"):
        MaskGenerator(196, ratio)


def test_bad_forward_inputs():
    model = tiny_model("vit", semantic=True)
    visible, masked = masks()
    with pytest.raises(InputError, match="does not divide image size"):
        model.forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(InputError, match="same number of patches in every row"):
        uneven = masked.clone()
        uneven[0, ~masked[0]] = True
        model.forward_pretrain(images(), visible, uneven)
    with pytest.raises(InputError, match=r"layer must be in 1\.\.3"):
        model.forward_features(images(), layer=4)
