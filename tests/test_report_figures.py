"""semanticmim.report.figures: every figure writes a valid, deterministic PNG; bad inputs are one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from semanticmim.errors import InputError
from semanticmim.report import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RNG = np.random.default_rng(0)
GRID = (4, 4)
IMAGES = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
VARIANTS = ("mocov3", "beit", "beit-semanticmim")


def rand(*shape: int) -> np.ndarray:
    return RNG.random(shape).astype(np.float32)


def check_png(path: Path, min_size: tuple[int, int] = (100, 100)) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    with Image.open(path) as image:
        image.verify()
    assert not list(path.parent.glob(".*.tmp"))
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert image.size[0] <= 2000 and image.size[1] <= 2000  # small: dpi 100
        return image.size


def test_patch_queries_figure(tmp_path):
    maps = {v: rand(2, 3, *GRID) for v in VARIANTS}
    maps["beit"] = torch.from_numpy(maps["beit"])  # tensors are accepted too
    width, height = check_png(figures.plot_patch_queries(IMAGES, maps, [0, 5, 15], GRID, tmp_path / "fig7.png"))
    assert height > width  # 6 rows (2 images x 3 variants) of 3 queries
    with pytest.raises(InputError, match=r"maps\['beit'\]: expected shape \(2, 3, 4, 4\), got \(2, 2, 4, 4\)"):
        figures.plot_patch_queries(IMAGES, {**maps, "beit": rand(2, 2, *GRID)}, [0, 5, 15], GRID, tmp_path / "x.png")
    with pytest.raises(InputError, match=r"queries \[16\]"):
        figures.plot_patch_queries(IMAGES, {"a": rand(2, 1, *GRID)}, [16], GRID, tmp_path / "x.png")
    with pytest.raises(InputError, match="uint8"):
        figures.plot_patch_queries(IMAGES / 255.0, maps, [0, 5, 15], GRID, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_prefix_queries_and_proxy_heatmaps(tmp_path):
    maps = {"mocov3": rand(1, *GRID), "beit-semanticmim": rand(8, *GRID)}
    check_png(figures.plot_prefix_queries(IMAGES[0], maps, tmp_path / "fig8.png"))
    check_png(figures.plot_proxy_heatmaps(maps, tmp_path / "fig9.png", n_images=500))
    with pytest.raises(InputError, match="same patch grid"):
        figures.plot_prefix_queries(IMAGES[0], {**maps, "odd": rand(2, 3, 3)}, tmp_path / "x.png")
    with pytest.raises(InputError, match=r"image: expected shape \(\?, \?, 3\)"):
        figures.plot_prefix_queries(IMAGES, maps, tmp_path / "x.png")
    with pytest.raises(InputError, match=r"maps\['beit'\]: expected shape \(\?, \?, \?\), got \(4, 4\)"):
        figures.plot_proxy_heatmaps({"beit": rand(*GRID)}, tmp_path / "x.png", n_images=3)
    with pytest.raises(InputError, match="n_images=0"):
        figures.plot_proxy_heatmaps(maps, tmp_path / "x.png", n_images=0)


def test_ownership_picks_the_token_attending_most():
    maps = np.zeros((2, 2, 2))
    maps[0, 0, :] = 0.5  # token 0 on the top row, token 1 on the bottom row
    maps[1, 1, :] = 0.5
    assert figures._ownership(maps).tolist() == [[0, 0], [1, 1]]


def test_depth_figure(tmp_path):
    maps = {v: rand(3, *GRID) for v in VARIANTS}
    check_png(figures.plot_depth(maps, [1, 2, 3], tmp_path / "fig10.png"))
    check_png(figures.plot_depth(maps, [1, 2, 3], tmp_path / "fig10b.png", image=IMAGES[0], query=6))
    with pytest.raises(InputError, match=r"expected shape \(2, \?, \?\), got \(3, 4, 4\)"):
        figures.plot_depth(maps, [1, 2], tmp_path / "x.png")
    with pytest.raises(InputError, match=r"queries \[99\]"):
        figures.plot_depth(maps, [1, 2, 3], tmp_path / "x.png", query=99)


def test_attention_distance_and_scores(tmp_path):
    dist = {v: rand(6, 3) * 50 for v in VARIANTS}
    check_png(figures.plot_attention_distance(dist, tmp_path / "fig14.png"))
    with pytest.raises(InputError, match=r"dist\['beit'\]: expected shape \(\?, \?\)"):
        figures.plot_attention_distance({"beit": rand(6)}, tmp_path / "x.png")
    df = pd.DataFrame({"variant": [*VARIANTS, "random-init"], "consistency": [1.8, 2.5, 3.1, 1.0],
                       "coverage": [0.3, 0.5, 0.9, 0.0], "evenness": [None, None, 0.8, 0.9],
                       "exclusivity": [None, None, 0.6, 0.0]})
    check_png(figures.plot_consistency_completeness(df, tmp_path / "cc.png"))
    with pytest.raises(InputError, match=r"missing columns \['coverage'\]"):
        figures.plot_consistency_completeness(df.drop(columns="coverage"), tmp_path / "x.png")
    with pytest.raises(InputError, match="no rows"):
        figures.plot_consistency_completeness(df.iloc[:0], tmp_path / "x.png")


def test_curves(tmp_path):
    curves = {v: (np.arange(10) * 5, np.exp(-np.arange(10) / (i + 2))) for i, v in enumerate(VARIANTS)}
    check_png(figures.plot_curves(curves, tmp_path / "loss.png", "pretraining loss"))
    with pytest.raises(InputError, match=r"curves\['beit'\]: 10 steps but 9 values"):
        figures.plot_curves({"beit": (np.arange(10), np.zeros(9))}, tmp_path / "x.png", "loss")
    with pytest.raises(InputError, match="non-empty dict"):
        figures.plot_curves({}, tmp_path / "x.png", "loss")


def test_figures_are_deterministic_and_leave_pyplot_alone(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    maps = {v: np.linspace(0, 1, 3 * 16).reshape(3, *GRID) for v in VARIANTS}
    first = figures.plot_depth(maps, [1, 5, 9], tmp_path / "a.png").read_bytes()
    assert figures.plot_depth(maps, [1, 5, 9], tmp_path / "b.png").read_bytes() == first
    assert matplotlib.get_backend() == backend
