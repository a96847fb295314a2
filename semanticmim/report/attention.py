"""Attention analysis through the exported timm encoder: explicit softmax attention, the paper's mean
attention distance (appendix A, Fig. 14), and two measured scores the paper only shows qualitatively,
consistency and completeness (§3.2, §5).

Everything works on any timm `VisionTransformer` (with or without a cls token, with register tokens,
`no_embed_class`, `qk_norm`, layer-scale), so MoCo v3, BEiT, SemanticMIM and third-party ViTs are
measured the same way. Token order is timm's: `T = P + N` with P prefix tokens (cls, then registers;
for our exports the K proxies) followed by the N patches in raster order.

Definitions (the report page quotes these):

* attention rows used by the maps and scores are restricted to patch keys and renormalised to sum to 1
  over those keys per head ("renormalised over patch keys": the mass a query puts on prefix tokens is
  dropped, not counted as distance 0 or as a class), then averaged over heads (`split_rows`).
* mean attention distance of a head = mean over images and patch queries q of
  `sum_j a~_qj * ||c_q - c_j||`, a~ the head's row renormalised over patch keys, c the patch centres in
  pixels (the query itself included, at distance 0). Common re-implementations of Raghu et al. (2021)
  drop the prefix columns without renormalising, which shrinks every distance by the prefix mass.
* consistency = mean over labelled patch queries q (class c = label(q)) of
  `(attention mass of q on labelled patches of class c) / (fraction of labelled patches of class c)`,
  the mass renormalised over labelled patch keys (the query itself included). 1.0 = no preference for
  the own class (uniform attention), 1/area(c) = all attention on the own class, 0 = none on it. A purely
  local attention also scores > 1 (neighbours tend to share the class): read it next to the distance.
* completeness, per image with at least 2 labelled classes, each prefix token's row renormalised over
  labelled patch keys; area a_c = class c's fraction of labelled patches, m_tc = token t's mass on c:
  - excess e_tc = (m_tc - a_c) / (1 - a_c): 0 = uniform attention's share, 1 = all of t's mass on c;
    class c is *covered* when max_t e_tc >= threshold (default 0.5); coverage = covered classes /
    classes present, averaged over images. Uniform attention -> 0; all tokens on one class -> 1/#classes;
    tokens that jointly focus each on a different class -> 1.
  - evenness (K >= 2) = entropy of the argmax-token ownership of the image's patches (rows renormalised
    over all patch keys; ties go to the lowest token index) / log K: 1 = each token owns an equal share,
    0 = one token owns every patch. Near-identical maps (a random-init encoder) can still score high,
    their argmax being noise, so it is reported with
  - exclusivity (K >= 2) = mutual information between token and patch, I(T; J) / log K, with
    p(t, j) = a~_tj / K: 1 = the tokens attend to disjoint regions, 0 = identical maps.
  Both are also computed on the image-averaged maps (the paper's Fig. 9 view). K = 1 leaves evenness and
  exclusivity undefined: None.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from semanticmim.errors import InputError

IGNORE_INDEX = 255
COVERAGE_THRESHOLD = 0.5
_EPS = 1e-12


# ------------------------------------------------------------------------------- extraction


def _vit(model: nn.Module) -> VisionTransformer:
    """Accept a timm VisionTransformer or anything holding one as `.model` (semanticmim.eval Encoder)."""
    model = getattr(model, "model", model)
    if not isinstance(model, VisionTransformer):
        raise InputError(f"attention analysis needs a timm VisionTransformer, got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if not isinstance(block, Block | ResPostBlock) or not isinstance(block.attn, Attention):
            raise InputError(f"block {i + 1} is a {type(block).__name__} with {type(block.attn).__name__}; "
                             "attention extraction supports timm Block/ResPostBlock with timm Attention")
    return model


def _check_blocks(blocks: list[int] | None, depth: int) -> list[int]:
    if blocks is None:
        return list(range(1, depth + 1))
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise InputError(f"blocks {bad} are outside the encoder's blocks 1..{depth}")
    return sorted(set(blocks))


def _block_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x: (B, T, D) block input -> (B, heads, T, T) softmax probabilities, as the unfused timm path."""
    attn = block.attn
    h = x if isinstance(block, ResPostBlock) else block.norm1(x)
    b, t, _ = h.shape
    qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


def _iter_attention(model: VisionTransformer, images: torch.Tensor, blocks: list[int]) -> Iterator[
        tuple[int, torch.Tensor]]:
    """Yield (1-based block, (B, heads, T, T)) in block order, running the model's own embedding path."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    wanted = set(blocks)
    for i, block in enumerate(model.blocks[: max(blocks)], start=1):
        if i in wanted:
            yield i, _block_attention(block, x)
        x = block(x)


def _eval_mode(model: nn.Module) -> bool:
    was_training = model.training
    model.eval()  # dropout / patch-drop / drop-path would make the maps random
    return was_training


def attention_maps(model: nn.Module, images: torch.Tensor, blocks: list[int] | None = None) -> dict[
        int, torch.Tensor]:
    """Softmax attention of the requested 1-based blocks (None = all), computed explicitly.

    model: timm VisionTransformer (or an `Encoder`); images: (B, 3, H, W), already normalised.
    Returns {block: (B, heads, T, T) float32}, T = num_prefix_tokens + N; rows sum to 1.
    """
    vit = _vit(model)
    blocks = _check_blocks(blocks, len(vit.blocks))
    was_training = _eval_mode(vit)
    try:
        with torch.no_grad():
            return dict(_iter_attention(vit, images, blocks))
    finally:
        vit.train(was_training)


def token_grid(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
    """(gh, gw) patch grid the model uses for images of (H, W)."""
    vit = _vit(model)
    if vit.dynamic_img_size:
        return tuple(vit.patch_embed.dynamic_feat_size(tuple(image_size)))
    return tuple(vit.patch_embed.grid_size)


def patch_size_of(model: nn.Module) -> tuple[int, int]:
    return tuple(_vit(model).patch_embed.patch_size)


# ------------------------------------------------------------------------------- row helpers


def _as_tensor(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a tensor or numpy array, got {type(x).__name__}")
    return x


def split_rows(attn: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """attn: (B, heads, T, T) -> (prefix rows (B, P, N), patch rows (B, N, N)) over the patch keys: each
    head's row renormalised to sum to 1 over the patch keys, then averaged over heads."""
    attn = _as_tensor(attn, "attn")
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2] or not 0 <= num_prefix < attn.shape[-1]:
        raise InputError(f"attn: expected (B, heads, T, T) with T > num_prefix={num_prefix}, got {tuple(attn.shape)}")
    rows = _renormalise(attn.double()[..., num_prefix:]).mean(1)
    return rows[:, :num_prefix].float(), rows[:, num_prefix:].float()


def query_maps(attn: torch.Tensor, queries: list[int], grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """attn: (B, heads, T, T) -> (B, q, gh, gw) head-averaged maps of the patch queries (indices into the N
    patches, raster order), renormalised over patch keys (Fig. 7, Fig. 10)."""
    _, patch_rows = split_rows(attn, num_prefix)
    if patch_rows.shape[1] != grid[0] * grid[1] or any(not 0 <= q < patch_rows.shape[1] for q in queries):
        raise InputError(f"queries {queries} / grid {grid} do not fit {patch_rows.shape[1]} patches")
    return patch_rows[:, queries].reshape(len(patch_rows), len(queries), *grid)


def prefix_maps(attn: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """attn: (B, heads, T, T) -> (B, P, gh, gw) head-averaged maps of the prefix queries (Fig. 8, Fig. 9)."""
    prefix_rows, _ = split_rows(attn, num_prefix)
    if prefix_rows.shape[2] != grid[0] * grid[1]:
        raise InputError(f"grid {grid} does not fit {prefix_rows.shape[2]} patches")
    return prefix_rows.reshape(*prefix_rows.shape[:2], *grid)


def _renormalise(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.sum(-1, keepdim=True).clamp_min(_EPS)


def labels_to_patches(labels: torch.Tensor | np.ndarray, patch_size: int, ignore_index: int = IGNORE_INDEX,
                 min_fraction: float = 0.5) -> torch.Tensor:
    """Pixel labels (B, H, W) -> patch labels (B, N), raster order: the most frequent labelled class of each
    patch (ties: the lowest class id), or `ignore_index` when under `min_fraction` of its pixels are labelled.
    H and W must be multiples of patch_size."""
    labels = _as_tensor(labels, "labels").long()
    if labels.ndim != 3 or labels.shape[1] % patch_size or labels.shape[2] % patch_size:
        raise InputError(f"labels: expected (B, H, W) with H, W multiples of {patch_size}, got {tuple(labels.shape)}")
    b, h, w = labels.shape
    cells = labels.view(b, h // patch_size, patch_size, w // patch_size, patch_size)
    cells = cells.permute(0, 1, 3, 2, 4).reshape(b, -1, patch_size * patch_size)
    valid = cells != ignore_index
    classes = int(cells[valid].max()) + 1 if valid.any() else 1
    counts = torch.zeros(b, cells.shape[1], classes + 1, dtype=torch.long, device=cells.device)
    counts.scatter_add_(2, torch.where(valid, cells, classes), torch.ones_like(cells))
    majority = counts[..., :classes].argmax(-1)
    enough = valid.float().mean(-1) >= min_fraction
    return torch.where(enough, majority, torch.full_like(majority, ignore_index))


def patch_queries(grid: tuple[int, int], count: int, seed: int) -> list[int]:
    """`count` distinct patch indices (raster order over grid (gh, gw)), fixed by `seed`, sorted."""
    n = grid[0] * grid[1]
    if not 0 < count <= n:
        raise InputError(f"patch_queries: count={count} must be in 1..{n} for a {grid[0]}x{grid[1]} grid")
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=count, replace=False))


# ------------------------------------------------------------------------------- attention distance


def _pairwise_distance(grid: tuple[int, int], patch_size: int | tuple[int, int]) -> torch.Tensor:
    """(N, N) Euclidean distance in pixels between patch centres, raster order."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    yy, xx = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([yy.flatten() * ph, xx.flatten() * pw], dim=1).double()
    return torch.cdist(centres, centres)


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int | tuple[int, int],
                            num_prefix: int) -> torch.Tensor:
    """attn: (B, heads, T, T), T = num_prefix + gh*gw -> (heads,) mean attention distance in pixels.

    Patch queries over patch keys only; each row is renormalised over the patch keys (the prefix-key mass
    is dropped), then the attention-weighted distance between query and key patch centres is averaged
    over queries and images (paper appendix A; Raghu et al. 2021)."""
    attn = _as_tensor(attn, "attn")
    n = grid[0] * grid[1]
    if attn.ndim != 4 or attn.shape[-2:] != (num_prefix + n, num_prefix + n):
        raise InputError(f"attn: expected (B, heads, {num_prefix + n}, {num_prefix + n}) for grid {grid} and "
                         f"{num_prefix} prefix tokens, got {tuple(attn.shape)}")
    rows = _renormalise(attn[..., num_prefix:, num_prefix:].double())
    per_query = (rows * _pairwise_distance(grid, patch_size).to(rows.device)).sum(-1)  # (B, heads, N)
    return per_query.mean(dim=(0, 2)).float()


def distance_per_layer(model: nn.Module, images: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
    """images: (B, 3, H, W) -> (depth, heads) mean attention distance in pixels of every block and head;
    `batch_size` bounds memory (results are image-weighted, so independent of it)."""
    vit = _vit(model)
    grid, patch = token_grid(vit, images.shape[-2:]), patch_size_of(vit)
    blocks = list(range(1, len(vit.blocks) + 1))
    total = np.zeros((len(blocks), vit.blocks[0].attn.num_heads))
    was_training = _eval_mode(vit)
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size or len(images)):
                for block, attn in _iter_attention(vit, chunk, blocks):
                    distance = mean_attention_distance(attn, grid, patch, vit.num_prefix_tokens)
                    total[block - 1] += distance.double().cpu().numpy() * len(chunk)
    finally:
        vit.train(was_training)
    return total / len(images)


# ------------------------------------------------------------------------------- consistency


def _check_labels(labels: torch.Tensor | np.ndarray, b: int, n: int, name: str) -> torch.Tensor:
    labels = _as_tensor(labels, "patch_labels").long()
    if labels.shape != (b, n):
        raise InputError(f"patch_labels: expected ({b}, {n}) to match {name}, got {tuple(labels.shape)}")
    return labels


def attention_consistency(attn_patch_rows: torch.Tensor | np.ndarray, patch_labels: torch.Tensor | np.ndarray,
                          ignore_index: int = IGNORE_INDEX) -> float:
    """attn_patch_rows: (B, heads, N, N) (each head's rows renormalised, then averaged) or head-averaged
    (B, N, N), patch queries over patch keys;
    patch_labels: (B, N) int, `ignore_index` = unlabelled. Returns the mean over labelled queries of
    own-class attention mass / own-class area (module docstring); NaN when no query is labelled."""
    rows = _as_tensor(attn_patch_rows, "attn_patch_rows").double()
    if rows.ndim == 4:
        rows = _renormalise(rows).mean(1)
    if rows.ndim != 3 or rows.shape[1] != rows.shape[2]:
        raise InputError(f"attn_patch_rows: expected (B, [heads,] N, N), got {tuple(rows.shape)}")
    labels = _check_labels(patch_labels, rows.shape[0], rows.shape[2], "attn_patch_rows")
    scores = []
    for a, y in zip(rows, labels, strict=True):
        valid = y != ignore_index
        if not valid.any():
            continue
        same = (y[:, None] == y[None, :]) & valid[None, :]  # (Nq, Nk)
        a = a * valid[None, :]
        total = a.sum(-1)
        mass = (a * same).sum(-1) / total.clamp_min(_EPS)
        area = same.sum(-1) / valid.sum()
        keep = valid & (total > _EPS)
        scores.append((mass / area.clamp_min(_EPS))[keep])
    scores = torch.cat(scores) if scores else torch.empty(0)
    return float(scores.mean()) if scores.numel() else math.nan


# ------------------------------------------------------------------------------- completeness


def _coverage(a: torch.Tensor, y: torch.Tensor, ignore_index: int, threshold: float) -> tuple[float, int] | None:
    """a: (K, N) one image's prefix rows; y: (N,). (covered fraction, #classes) or None if < 2 classes."""
    valid = y != ignore_index
    classes = y[valid].unique()
    if len(classes) < 2:
        return None
    rows = _renormalise(a[:, valid])
    onehot = (y[valid][:, None] == classes[None, :]).double()  # (Nv, C)
    mass, area = rows @ onehot, onehot.mean(0)  # (K, C), (C,)
    excess = (mass - area) / (1 - area)
    covered = excess.max(0).values >= threshold - 1e-9
    return float(covered.double().mean()), len(classes)


def _evenness(a: torch.Tensor) -> float:
    """a: (K, N) rows renormalised over all patches -> normalised entropy of the argmax ownership."""
    k = a.shape[0]
    share = torch.bincount(a.argmax(0), minlength=k).double() / a.shape[1]
    share = share[share > 0]
    return float(-(share * share.log()).sum() / math.log(k))


def _exclusivity(a: torch.Tensor) -> float:
    """a: (K, N) rows renormalised over all patches -> I(T; J) / log K with p(t, j) = a_tj / K."""
    k = a.shape[0]
    joint = a / k
    p_j = joint.sum(0, keepdim=True)
    terms = joint * (joint.clamp_min(_EPS).log() - p_j.clamp_min(_EPS).log() + math.log(k))
    return float(terms.sum() / math.log(k))


def attention_completeness(prefix_attn: torch.Tensor | np.ndarray, patch_labels: torch.Tensor | np.ndarray,
                           threshold: float | None = None, ignore_index: int = IGNORE_INDEX) -> dict:
    """prefix_attn: (B, K, N) each prefix token's attention over the patch keys (renormalised or not; it is
    renormalised here); patch_labels: (B, N). threshold: the excess a class needs from some token to be
    covered (None = COVERAGE_THRESHOLD = 0.5). Definitions in the module docstring.

    Returns {"coverage", "coverage_images" (images with >= 2 classes), "classes_per_image", "evenness",
    "exclusivity", "mean_map_evenness", "mean_map_exclusivity" (None when K = 1), "num_tokens",
    "images", "threshold"}; coverage is NaN when no image has 2 labelled classes."""
    a = _as_tensor(prefix_attn, "prefix_attn").double()
    if a.ndim != 3 or a.shape[1] < 1:
        raise InputError(f"prefix_attn: expected (B, K, N) with K >= 1, got {tuple(a.shape)}")
    labels = _check_labels(patch_labels, a.shape[0], a.shape[2], "prefix_attn")
    threshold = COVERAGE_THRESHOLD if threshold is None else float(threshold)
    per_image = [c for c in (_coverage(x, y, ignore_index, threshold) for x, y in zip(a, labels, strict=True)) if c]
    k = a.shape[1]
    rows = _renormalise(a)
    result = {
        "coverage": float(np.mean([c for c, _ in per_image])) if per_image else math.nan,
        "coverage_images": len(per_image),
        "classes_per_image": float(np.mean([n for _, n in per_image])) if per_image else math.nan,
        "evenness": None, "exclusivity": None, "mean_map_evenness": None, "mean_map_exclusivity": None,
        "num_tokens": k, "images": a.shape[0], "threshold": threshold,
    }
    if k >= 2:
        mean_map = _renormalise(rows.mean(0))
        result.update(
            evenness=float(np.mean([_evenness(r) for r in rows])),
            exclusivity=float(np.mean([_exclusivity(r) for r in rows])),
            mean_map_evenness=_evenness(mean_map), mean_map_exclusivity=_exclusivity(mean_map))
    return result
