"""Stage `attention@ENCODER`: the attention analysis of one timm-format encoder (paper Figs. 7–10, 14 and
the measured consistency / completeness) -> runs/attention/ENCODER/.

Computed through the exported timm encoder, so MoCo v3, BEiT, SemanticMIM and any third-party timm ViT
are treated alike. Fixed, seeded images of the profile's segmentation validation split and fixed query
patches (both recorded in run.json). Outputs: `maps.safetensors` (the arrays the figures draw), metrics.json
(numbers only: consistency, completeness, mean attention distance), run.json and skipped.jsonl
(unreadable images of the draw: counted and skipped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from safetensors.torch import save_file

from semanticmim.data.decode import UnreadableImage, load_rgb
from semanticmim.data.layouts import read_label, read_split
from semanticmim.engine import distributed
from semanticmim.engine.progress import write_json_atomic
from semanticmim.errors import InputError
from semanticmim.eval.encoder import load_encoder
from semanticmim.report import (
    COVERAGE_THRESHOLD,
    attention_completeness,
    attention_consistency,
    attention_maps,
    distance_per_layer,
    labels_to_patches,
    patch_queries,
    split_rows,
)
from semanticmim.settings import Strict
from stages.common import run_info
from stages.params import read_section, resolve_path, validate


class AttentionParams(Strict):
    """`report.attention`: what the attention analysis looks at."""

    data_root: Path = Path("data/embedded/segmentation")
    data_format: Literal["voc", "ade20k", "pairs"] = "voc"
    split: str = "val"
    images: PositiveInt = 4  # Figs. 7, 8, 10: the first images of a seeded draw
    heatmap_images: PositiveInt = 64  # Fig. 9 and the scores: averaged over this many (paper: 500)
    queries: PositiveInt = 3  # patch queries per image (Fig. 7)
    depths: PositiveInt = 4  # Fig. 10: this many blocks, evenly spaced to the last
    seed: int = 0
    batch_size: PositiveInt = 16
    img_size: PositiveInt | None = None  # None: the encoder's own input size
    min_label_fraction: float = Field(0.5, gt=0.0, le=1.0)  # a patch's label: its majority class, if this share


def load_images(params: AttentionParams, root: Path, img_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[dict]]:
    """A seeded draw of `heatmap_images` images of the split, resized to `img_size`: -> uint8 images
    (B, 3, S, S), int64 labels (B, S, S) (255 = ignore), their paths, and the unreadable files skipped."""
    split = read_split(params.data_format, root, params.split)
    if not split.samples:
        raise InputError(f"{root}: split {params.split!r} has no images for the attention analysis")
    order = np.random.default_rng(params.seed).permutation(len(split.samples))[: params.heatmap_images]
    images, labels, paths, skipped = [], [], [], []
    for index in order.tolist():
        image_path, label_path = split.samples[index]
        try:
            pixels = torch.from_numpy(np.asarray(load_rgb(image_path), dtype=np.uint8).copy()).permute(2, 0, 1)
            label = torch.from_numpy(split.label_map.apply(read_label(label_path), label_path))
        except UnreadableImage as error:
            skipped.append({"path": str(error.path), "reason": error.reason})
            continue
        images.append(F.interpolate(pixels[None].float(), size=(img_size, img_size), mode="bicubic",
                                    antialias=True).clamp(0, 255).round().to(torch.uint8)[0])
        labels.append(F.interpolate(label[None, None].float(), size=(img_size, img_size), mode="nearest")[0, 0].long())
        paths.append(str(Path(image_path).relative_to(root)))
    if not images:
        raise InputError(f"{root}: no readable image in split {params.split!r} for the attention analysis")
    return torch.stack(images), torch.stack(labels), paths, skipped


def depth_choice(depth: int, count: int) -> list[int]:
    """`count` blocks (1-based) evenly spaced up to the last: 12 blocks, 4 -> [3, 6, 9, 12]."""
    count = min(count, depth)
    return sorted({max(1, round(depth * (i + 1) / count)) for i in range(count)})


@torch.no_grad()
def analyse(encoder, images: torch.Tensor, labels: torch.Tensor, params: AttentionParams) -> tuple[dict, dict, dict]:
    """images: uint8 (B, 3, S, S); labels: (B, S, S) -> (arrays for the figures, numbers, what was chosen).

    Rows are the last block's attention, each head's row renormalised over the patch keys, then averaged
    over heads (`split_rows`); the queries are fixed patch indices."""
    model = encoder.model.eval()
    patch = int(model.patch_embed.patch_size[0])
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    prefix, depth = int(model.num_prefix_tokens), len(model.blocks)
    depths = depth_choice(depth, params.depths)
    queries = patch_queries(grid, params.queries, params.seed)
    normalised = encoder.normalize(images)
    prefix_rows, patch_rows, depth_rows = [], [], {d: [] for d in depths}
    for start in range(0, len(images), params.batch_size):
        chunk = normalised[start:start + params.batch_size]
        maps = attention_maps(model, chunk, sorted({*depths, depth}))
        rows = split_rows(maps[depth], prefix)
        prefix_rows.append(rows[0])
        patch_rows.append(rows[1])
        for d in depths:
            if start < params.images:
                depth_rows[d].append(split_rows(maps[d], prefix)[1][:, queries[0]])
    prefix_all, patch_all = torch.cat(prefix_rows), torch.cat(patch_rows)  # (B, P, N), (B, N, N)
    shown = min(params.images, len(images))
    arrays = {
        "images": images[:shown].permute(0, 2, 3, 1).contiguous(),
        "patch_queries": patch_all[:shown, queries].reshape(shown, len(queries), *grid),
        "depth": torch.stack([torch.cat(depth_rows[d])[0].reshape(grid) for d in depths]),
        "distance": torch.from_numpy(distance_per_layer(model, normalised, params.batch_size)).float(),
    }
    patch_labels = labels_to_patches(labels, patch, min_fraction=params.min_label_fraction)
    numbers = {"consistency": attention_consistency(patch_all, patch_labels),
               "mean_distance_last_block": float(arrays["distance"][-1].mean())}
    if prefix:
        arrays["prefix_queries"] = prefix_all[0].reshape(prefix, *grid)
        arrays["proxy_heatmaps"] = prefix_all.mean(0).reshape(prefix, *grid)
        completeness = attention_completeness(prefix_all, patch_labels)
        numbers.update({k: float(v) for k, v in completeness.items()
                        if isinstance(v, int | float) and not isinstance(v, bool) and k != "threshold"})
    chosen = {"queries": queries, "depths": depths, "grid": list(grid), "patch_size": patch, "prefix_tokens": prefix,
              "coverage_threshold": COVERAGE_THRESHOLD, "heatmap_images": len(images)}
    return arrays, numbers, chosen


def run(encoder_dir: Path, params_file: Path, out_dir: Path, device: str = "auto") -> dict:
    values = read_section(params_file, "report").get("attention") or {}
    params = validate(AttentionParams, values, params_file, "report.attention")
    env = distributed.setup(device)
    try:
        encoder = load_encoder(encoder_dir, params.img_size, size_key="report.attention.img_size")
        encoder.model.to(env.device)
        img_size = int(encoder.model.patch_embed.img_size[0])
        root = resolve_path(params.data_root, params_file)
        images, labels, paths, skipped = load_images(params, root, img_size)
        arrays, numbers, chosen = analyse(encoder, images.to(env.device), labels.to(env.device), params)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".maps.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in arrays.items()}, str(tmp),
                  metadata={"chosen": json.dumps(chosen)})
        tmp.replace(out_dir / "maps.safetensors")
        info = run_info("attention", {"settings": params.model_dump(mode="json"), **chosen, "images": paths,
                                      "skipped": skipped, "encoder": encoder.identity}, params_file, env)
        write_json_atomic(out_dir / "run.json", info)
        write_json_atomic(out_dir / "metrics.json", numbers)
        (out_dir / "skipped.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in skipped))
        return numbers
    finally:
        distributed.teardown()
