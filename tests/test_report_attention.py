"""semanticmim.report.attention: explicit attention equals the blocks' real output; distance, consistency and
completeness give known answers on constructed maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from semanticmim.errors import InputError
from semanticmim.report.attention import (
    attention_completeness,
    attention_consistency,
    attention_maps,
    distance_per_layer,
    labels_to_patches,
    mean_attention_distance,
    patch_queries,
    prefix_maps,
    query_maps,
    split_rows,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0)
VARIANTS = {
    "cls": dict(),
    "cls+registers": dict(reg_tokens=3),
    "no-cls": dict(class_token=False, global_pool="avg"),
    "no-embed-class+registers": dict(reg_tokens=2, no_embed_class=True),
    "qk-norm": dict(qk_norm=True),
    "beit-style": dict(reg_tokens=7, init_values=0.1, dynamic_img_size=True),
}


def tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(**{**TINY, **kwargs})
    with torch.no_grad():  # trained-looking weights: biases, layer scales and norms away from their init
        for name, param in model.named_parameters():
            if name.endswith(("bias", "gamma")) or "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


def real_attention_outputs(model: VisionTransformer, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(block input x, block.attn(block.norm1(x))) of every block, captured from the model's own forward."""
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for b in model.blocks]
    with torch.no_grad():
        model.forward_features(images)
        outputs = [block.attn(block.norm1(x)) for block, x in zip(model.blocks, inputs, strict=True)]
    for hook in hooks:
        hook.remove()
    return list(zip(inputs, outputs, strict=True))


def through_projection(block, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weights (B, heads, T, T) @ v, then the attention's own output path."""
    attn = block.attn
    b, t, _ = x.shape
    v = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    return attn.proj(attn.norm((weights @ v).transpose(1, 2).reshape(b, t, -1)))


def check_against_blocks(model: VisionTransformer, images: torch.Tensor) -> None:
    maps = attention_maps(model, images)
    n = (images.shape[-2] // 8) * (images.shape[-1] // 8)
    assert sorted(maps) == list(range(1, len(model.blocks) + 1))
    for (i, weights), block, (x, real) in zip(maps.items(), model.blocks, real_attention_outputs(model, images),
                                              strict=True):
        assert weights.shape == (len(images), 2, model.num_prefix_tokens + n, model.num_prefix_tokens + n)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(through_projection(block, x, weights), real, atol=1e-5, rtol=1e-5,
                                       msg=f"block {i}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_explicit_attention_reproduces_each_blocks_attention_output(variant):
    model = tiny_vit(**VARIANTS[variant])
    check_against_blocks(model, torch.randn(2, 3, 32, 32))


def test_dynamic_size_and_a_subset_of_blocks():
    model = tiny_vit(**VARIANTS["beit-style"])
    images = torch.randn(1, 3, 48, 40)  # 6x5 grid, pos-embed resampled by the model's own _pos_embed
    check_against_blocks(model, images)
    maps = attention_maps(model, images, blocks=[3, 1])
    assert sorted(maps) == [1, 3] and maps[3].shape[-1] == 8 + 30
    torch.testing.assert_close(maps[3], attention_maps(model, images)[3])


def test_our_beit_semanticmim_export_through_load_encoder(tmp_path):
    from support import export_tiny_encoder

    from semanticmim.eval.encoder import load_encoder

    encoder = load_encoder(export_tiny_encoder(tmp_path, "beit-semanticmim", num_proxy=3))
    assert encoder.num_prefix_tokens == 3 and encoder.model.blocks[0].ls1.gamma is not None
    check_against_blocks(encoder.model, torch.randn(2, 3, 32, 32))
    assert attention_maps(encoder, torch.randn(1, 3, 32, 32), [2])[2].shape == (1, 2, 19, 19)


def test_training_mode_is_restored_and_bad_blocks_are_refused():
    model = tiny_vit(drop_rate=0.5).train()
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(attention_maps(model, images)[2], attention_maps(model, images)[2])  # no dropout
    assert model.training
    with pytest.raises(InputError, match=r"outside the encoder's blocks 1\.\.3"):
        attention_maps(model, images, [0])
    with pytest.raises(InputError, match="timm VisionTransformer"):
        attention_maps(torch.nn.Linear(2, 2), images)


# ----------------------------------------------------------------------------------- distance


def brute_force_mean_pairwise_distance(gh: int, gw: int, patch: int) -> float:
    centres = [(y * patch, x * patch) for y in range(gh) for x in range(gw)]
    return float(np.mean([[math.dist(a, b) for b in centres] for a in centres]))


def with_prefix(patch_block: torch.Tensor, num_prefix: int, prefix_mass: float) -> torch.Tensor:
    """(B, H, N, N) rows over patches -> (B, H, P+N, P+N) with `prefix_mass` of every row on the prefix."""
    b, h, n, _ = patch_block.shape
    full = torch.full((b, h, num_prefix + n, num_prefix + n), prefix_mass / max(num_prefix, 1))
    full[..., num_prefix:, num_prefix:] = patch_block * (1 - prefix_mass)
    return full


def test_identity_attention_has_distance_zero():
    attn = with_prefix(torch.eye(16).expand(2, 3, 16, 16), num_prefix=2, prefix_mass=0.3)
    torch.testing.assert_close(mean_attention_distance(attn, (4, 4), 16, 2), torch.zeros(3))


def test_uniform_attention_gives_the_grids_mean_pairwise_distance_whatever_the_prefix_mass():
    expected = brute_force_mean_pairwise_distance(4, 4, 16)
    assert expected == pytest.approx(16 * 2.008, abs=0.01)  # about two patches
    uniform = torch.full((2, 1, 16, 16), 1 / 16)
    for num_prefix, prefix_mass in ((0, 0.0), (1, 0.5), (4, 0.9)):
        attn = with_prefix(uniform, num_prefix, prefix_mass)
        assert mean_attention_distance(attn, (4, 4), 16, num_prefix).item() == pytest.approx(expected, rel=1e-6)


def test_distance_is_per_head_and_uses_rectangular_patches():
    right_neighbour = torch.zeros(6, 6)  # 2x3 grid: each query looks one patch to the right, else left
    for q in range(6):
        right_neighbour[q, q + 1 if q % 3 < 2 else q - 1] = 1
    attn = torch.stack([torch.eye(6), right_neighbour])[None]  # head 0: self; head 1: horizontal neighbour
    torch.testing.assert_close(mean_attention_distance(attn, (2, 3), (16, 8), 0), torch.tensor([0.0, 8.0]))
    with pytest.raises(InputError, match=r"expected \(B, heads, 7, 7\)"):
        mean_attention_distance(attn, (2, 3), 16, 1)


def test_distance_per_layer_matches_the_maps_and_is_batch_size_independent():
    model = tiny_vit(reg_tokens=1)
    images = torch.randn(3, 3, 32, 32)
    table = distance_per_layer(model, images)
    assert table.shape == (3, 2)
    maps = attention_maps(model, images)
    for block in (1, 3):
        np.testing.assert_allclose(table[block - 1], mean_attention_distance(maps[block], (4, 4), 8, 2), rtol=1e-5)
    np.testing.assert_allclose(distance_per_layer(model, images, batch_size=2), table, rtol=1e-6)
    assert ((table > 0) & (table < 8 * 3 * math.sqrt(2))).all()


# ----------------------------------------------------------------------------------- helpers


def test_patch_queries_are_deterministic_distinct_and_checked():
    first = patch_queries((14, 14), 4, seed=0)
    assert first == patch_queries((14, 14), 4, seed=0) and first == sorted(set(first)) and len(first) == 4
    assert all(0 <= q < 196 for q in first) and first != patch_queries((14, 14), 4, seed=1)
    assert patch_queries((2, 2), 4, seed=3) == [0, 1, 2, 3]
    with pytest.raises(InputError, match=r"count=5 must be in 1\.\.4"):
        patch_queries((2, 2), 5, seed=0)


def test_rows_and_maps_are_head_averaged_and_renormalised_over_patches():
    attn = torch.zeros(1, 2, 1 + 4, 1 + 4)
    attn[0, 0, :, 0], attn[0, 0, :, 1] = 0.5, 0.5  # head 0: half on the cls token, half on patch 0
    attn[0, 1, :, 2] = 1.0  # head 1: all on patch 1
    prefix, patches = split_rows(attn, 1)
    torch.testing.assert_close(prefix, torch.tensor([[[0.5, 0.5, 0.0, 0.0]]]))
    torch.testing.assert_close(patches[0, 3], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert query_maps(attn, [3, 0], (2, 2), 1).shape == (1, 2, 2, 2)
    torch.testing.assert_close(prefix_maps(attn, (2, 2), 1)[0, 0], torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    with pytest.raises(InputError, match="do not fit"):
        query_maps(attn, [4], (2, 2), 1)


def test_labels_to_patches_takes_the_majority_and_ignores_mostly_unlabelled_patches():
    labels = np.full((1, 4, 4), 255)
    labels[0, :2, :2] = [[3, 3], [3, 1]]  # patch 0: majority 3
    labels[0, :2, 2:] = [[2, 2], [255, 255]]  # patch 1: half labelled -> 2
    labels[0, 2:, :2] = [[4, 255], [255, 255]]  # patch 2: a quarter labelled -> ignore
    labels[0, 2:, 2:] = [[1, 5], [5, 1]]  # patch 3: a tie -> the lower class
    assert labels_to_patches(labels, 2).tolist() == [[3, 2, 255, 1]]
    with pytest.raises(InputError, match="multiples of 3"):
        labels_to_patches(labels, 3)


# ----------------------------------------------------------------------------------- consistency

# 4x4 grid: class 0 = first row (area 1/4), class 1 = the other three rows (area 3/4)
LABELS = torch.tensor([[0] * 4 + [1] * 12])


def same_class_uniform(labels: torch.Tensor) -> torch.Tensor:
    same = (labels[:, :, None] == labels[:, None, :]).float()
    return same / same.sum(-1, keepdim=True)


def test_uniform_attention_has_consistency_one():
    assert attention_consistency(torch.full((1, 16, 16), 1 / 16), LABELS) == pytest.approx(1.0)
    assert attention_consistency(torch.full((1, 3, 16, 16), 1 / 16), LABELS) == pytest.approx(1.0)


def test_own_class_attention_scores_the_inverse_area():
    # class-0 queries: 1 / (1/4) = 4; class-1 queries: 1 / (3/4); mean over 16 queries = (4*4 + 12*4/3) / 16 = 2
    assert attention_consistency(same_class_uniform(LABELS), LABELS) == pytest.approx(2.0)
    partly_unlabelled = LABELS.clone()
    partly_unlabelled[0, 4:8] = 255  # neither queries nor keys: areas become 4/12 and 8/12, the class-1 rows
    # (uniform over patches 4..15) are renormalised over 8..15; (4 * 12/4 + 8 * 12/8) / 12 = 2
    assert attention_consistency(same_class_uniform(LABELS), partly_unlabelled) == pytest.approx(2.0)


def test_other_class_attention_scores_zero_and_heads_are_averaged():
    other = 1 - (LABELS[:, :, None] == LABELS[:, None, :]).float()
    assert attention_consistency(other / other.sum(-1, keepdim=True), LABELS) == pytest.approx(0.0)
    heads = torch.stack([same_class_uniform(LABELS), torch.full((1, 16, 16), 1 / 16)], dim=1)
    assert attention_consistency(heads, LABELS) == pytest.approx((2.0 + 1.0) / 2)


def test_consistency_bad_shapes_and_no_labels():
    with pytest.raises(InputError, match=r"patch_labels: expected \(1, 16\)"):
        attention_consistency(torch.full((1, 16, 16), 1 / 16), LABELS[:, :8])
    with pytest.raises(InputError, match="attn_patch_rows"):
        attention_consistency(torch.zeros(16, 16), LABELS)
    assert math.isnan(attention_consistency(torch.full((1, 16, 16), 1 / 16), torch.full((1, 16), 255)))


# ----------------------------------------------------------------------------------- completeness

# 4x4 grid: 4 classes, one per row (area 1/4 each)
ROWS = torch.arange(4).repeat_interleave(4)[None]


def on_class(labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """(1, K, N): token t attends uniformly to the patches of classes[t]."""
    rows = torch.stack([(labels[0] == c).float() for c in classes])
    return (rows / rows.sum(-1, keepdim=True))[None]


def test_tokens_each_on_a_different_class_are_complete_exclusive_and_even():
    result = attention_completeness(on_class(ROWS, [0, 1, 2, 3]), ROWS)
    assert result["coverage"] == 1.0 and result["classes_per_image"] == 4 and result["num_tokens"] == 4
    for key in ("evenness", "exclusivity", "mean_map_evenness", "mean_map_exclusivity"):
        assert result[key] == pytest.approx(1.0), key


def test_all_tokens_on_one_class_cover_one_class_and_do_not_divide_the_image():
    result = attention_completeness(on_class(ROWS, [2, 2, 2, 2]), ROWS)
    assert result["coverage"] == pytest.approx(1 / 4)
    assert result["evenness"] == pytest.approx(0.0) and result["exclusivity"] == pytest.approx(0.0, abs=1e-9)


def test_uniform_attention_covers_nothing_and_random_noise_is_not_exclusive():
    uniform = attention_completeness(torch.full((1, 4, 16), 1 / 16), ROWS)
    assert uniform["coverage"] == 0.0 and uniform["evenness"] == 0.0  # ties go to token 0
    assert uniform["exclusivity"] == pytest.approx(0.0, abs=1e-9)
    noise = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    noisy = torch.full((1, 4, 16), 1 / 16) * (1 + 1e-3 * noise)
    result = attention_completeness(noisy, ROWS)
    assert result["evenness"] > 0.5 and result["exclusivity"] < 1e-4  # argmax of noise vs measured overlap


def test_two_tokens_on_unequal_regions_are_exclusive_but_uneven():
    labels = torch.tensor([[0] * 12 + [1] * 4])  # class 0: 3/4 of the image, class 1: 1/4
    result = attention_completeness(on_class(labels, [0, 1]), labels)
    assert result["coverage"] == 1.0 and result["exclusivity"] == pytest.approx(1.0)
    assert result["evenness"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2))


def test_coverage_threshold_single_class_images_and_k1():
    half = on_class(ROWS, [0, 1]) * 0.5 + on_class(ROWS, [1, 0]) * 0.5  # both tokens: half on class 0, half on 1
    # excess on class 0 or 1 = (1/2 - 1/4) / (3/4) = 1/3: covered at threshold 0.3, not at the default 0.5
    assert attention_completeness(half, ROWS)["coverage"] == 0.0
    assert attention_completeness(half, ROWS, threshold=0.3)["coverage"] == pytest.approx(2 / 4)
    labels = torch.cat([ROWS, torch.zeros(1, 16, dtype=torch.long)])  # second image: one class, skipped
    cls_only = attention_completeness(torch.cat([on_class(ROWS, [3])] * 2), labels)
    assert cls_only["coverage"] == pytest.approx(1 / 4) and cls_only["coverage_images"] == 1
    assert cls_only["images"] == 2 and cls_only["evenness"] is None and cls_only["exclusivity"] is None
    unlabelled = labels.clone()
    unlabelled[0, :4] = 255  # class 0 unlabelled: three classes present, token on class 3 covers one
    assert attention_completeness(on_class(ROWS, [3]), unlabelled[:1])["coverage"] == pytest.approx(1 / 3)
    with pytest.raises(InputError, match="prefix_attn"):
        attention_completeness(torch.zeros(4, 16), ROWS)
