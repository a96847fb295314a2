"""The report's figures: attention maps (paper Figs. 7-10), mean attention distance (Fig. 14), the measured
consistency/completeness scores and pretraining curves. Small deterministic PNGs; every title says what
to look for.

Figures are drawn on a bare `matplotlib.figure.Figure` (Agg canvas), so importing this module never
changes pyplot's global backend and no figure outlives its call. Inputs are numpy arrays or tensors;
maps are (..., gh, gw) attention over the patch grid (from `semanticmim.report.attention`). Each writer
returns the path it wrote (via a temp file and a rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from semanticmim.errors import InputError

DPI = 100
PANEL = 1.6  # inches per attention panel
MAP_CMAP = "inferno"


# ----------------------------------------------------------------------------------- helpers


def _array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_shape(x, name: str, ndim: int, expected: Sequence[int | None] | None = None) -> np.ndarray:
    """x as a float/uint8 array with `ndim` dims matching `expected` (None = any size)."""
    x = _array(x, name)
    ok = x.ndim == ndim and (expected is None or all(e is None or e == s for e, s in zip(expected, x.shape,
                                                                                           strict=True)))
    if not ok:
        want = "(" + ", ".join("?" if e is None else str(e) for e in (expected or [None] * ndim)) + ")"
        raise InputError(f"{name}: expected shape {want}, got {tuple(x.shape)}")
    return x


def _check_maps(maps: Mapping, name: str, ndim: int, expected: Sequence[int | None] | None = None) -> dict:
    if not isinstance(maps, Mapping) or not maps:
        raise InputError(f"{name}: expected a non-empty dict variant -> array")
    return {str(k): _check_shape(v, f"{name}[{k!r}]", ndim, expected) for k, v in maps.items()}


def _check_image(image, name: str) -> np.ndarray:
    image = _check_shape(image, name, 3, (None, None, 3))
    if image.dtype != np.uint8:
        raise InputError(f"{name}: expected uint8 RGB pixels, got {image.dtype}")
    return image


def _figure(rows: int, cols: int, panel: float = PANEL, extra_height: float = 0.6) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cols * panel, rows * panel + extra_height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _save(fig: Figure, path: str | Path, title: str) -> Path:
    path = Path(path)
    fig.suptitle(title, fontsize=7, wrap=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    os.replace(tmp, path)
    return path


def _overlay(ax, image: np.ndarray | None, amap: np.ndarray) -> None:
    """Attention map (gh, gw) over the image (H, W, 3), or alone when image is None."""
    h, w = amap.shape if image is None else image.shape[:2]
    if image is not None:
        ax.imshow(image, extent=(0, w, h, 0))
    ax.imshow(amap, cmap=MAP_CMAP, alpha=1.0 if image is None else 0.6, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)


def _mark_query(ax, query: int, grid: tuple[int, int], size: tuple[int, int]) -> None:
    """Red box on patch `query` (raster index) of a grid drawn over `size` = (H, W) units."""
    r, c = divmod(int(query), grid[1])
    ph, pw = size[0] / grid[0], size[1] / grid[1]
    ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor="red", linewidth=1.5))


def _check_queries(queries: Sequence[int], grid: tuple[int, int]) -> list[int]:
    n = grid[0] * grid[1]
    if any(not 0 <= int(q) < n for q in queries):
        raise InputError(f"queries {list(queries)}: expected patch indices in 0..{n - 1} for grid {tuple(grid)}")
    return [int(q) for q in queries]


def _token_names(k: int) -> list[str]:
    return ["[CLS]"] if k == 1 else [f"[PROXY {t + 1}]" for t in range(k)]


# ----------------------------------------------------------------------------------- Figs. 7-10


def plot_patch_queries(images, maps: Mapping, queries: Sequence[int], grid: tuple[int, int],
                       path: str | Path) -> Path:
    """Fig. 7. images: (n, H, W, 3) uint8; maps: {variant: (n, q, gh, gw)} attention of the q patch queries;
    queries: q patch indices (raster order over grid (gh, gw)), marked with red boxes. One row per
    (image, variant), one column per query."""
    images = _check_shape(images, "images", 4, (None, None, None, 3))
    if images.dtype != np.uint8:
        raise InputError(f"images: expected uint8 RGB pixels, got {images.dtype}")
    queries = _check_queries(queries, grid)
    maps = _check_maps(maps, "maps", 4, (len(images), len(queries), *grid))
    fig, axes = _figure(len(images) * len(maps), len(queries))
    for i, image in enumerate(images):
        for v, (variant, m) in enumerate(maps.items()):
            row = i * len(maps) + v
            for j, q in enumerate(queries):
                ax = axes[row, j]
                _overlay(ax, image, m[i, j])
                _mark_query(ax, q, grid, image.shape[:2])
                if j == 0:
                    ax.set_ylabel(f"{variant}\nimage {i + 1}" if len(images) > 1 else variant, fontsize=7)
    return _save(fig, path, "Fig. 7: attention of patch queries (red boxes), heads averaged. Look for: the query's "
                 "whole object lighting up (consistency) rather than only its neighbours (MIM) or one foreground "
                 "map for every query (CL).")


def plot_prefix_queries(image, maps: Mapping, path: str | Path) -> Path:
    """Fig. 8. image: (H, W, 3) uint8; maps: {variant: (K, gh, gw)} attention of each prefix token ([CLS] for
    K = 1, [PROXY t] otherwise) over the patches. One row per variant, the image first."""
    image = _check_image(image, "image")
    maps = _check_maps(maps, "maps", 3)
    grids = {m.shape[1:] for m in maps.values()}
    if len(grids) != 1:
        raise InputError(f"maps: every variant needs the same patch grid, got {sorted(grids)}")
    k_max = max(m.shape[0] for m in maps.values())
    fig, axes = _figure(len(maps), k_max + 1)
    for row, (variant, m) in enumerate(maps.items()):
        axes[row, 0].imshow(image)
        axes[row, 0].set_ylabel(variant, fontsize=7)
        for t, name in enumerate(_token_names(len(m))):
            _overlay(axes[row, t + 1], image, m[t])
            axes[row, t + 1].set_title(name, fontsize=6)
        for t in range(len(m) + 1, k_max + 1):
            axes[row, t].axis("off")
    return _save(fig, path, "Fig. 8: attention of the [CLS]/[PROXY] tokens. Look for: different proxies on "
                 "different objects or regions, each map following one semantic region.")


def plot_proxy_heatmaps(maps: Mapping, path: str | Path, n_images: int) -> Path:
    """Fig. 9. maps: {variant: (K, gh, gw)} each prefix token's attention averaged over n_images images; the
    last column colours each patch by the token that attends to it most."""
    maps = _check_maps(maps, "maps", 3)
    if n_images < 1:
        raise InputError(f"n_images={n_images}: expected at least 1")
    k_max = max(m.shape[0] for m in maps.values())
    fig, axes = _figure(len(maps), k_max + 1)
    colours = ListedColormap(_palette(k_max))
    for row, (variant, m) in enumerate(maps.items()):
        for t, name in enumerate(_token_names(len(m))):
            _overlay(axes[row, t], None, m[t])
            axes[row, t].set_title(name, fontsize=6)
        for t in range(len(m), k_max):
            axes[row, t].axis("off")
        owner = _ownership(m)
        axes[row, k_max].imshow(owner, cmap=colours, vmin=-0.5, vmax=k_max - 0.5, interpolation="nearest")
        axes[row, k_max].set_title("owner", fontsize=6)
        axes[row, 0].set_ylabel(variant, fontsize=7)
    return _save(fig, path, f"Fig. 9: each token's attention averaged over {n_images} images; 'owner' = the token "
                 "attending most to each patch. Look for: proxies owning distinct, near-exclusive regions.")


def _ownership(m: np.ndarray) -> np.ndarray:
    """(K, gh, gw) maps -> (gh, gw) index of the token whose (per-token normalised) map is largest."""
    norm = m / np.maximum(m.reshape(len(m), -1).sum(-1), 1e-12)[:, None, None]
    return norm.argmax(0)


def _palette(k: int) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps["tab20" if k > 10 else "tab10"](np.arange(k) % (20 if k > 10 else 10))


def plot_depth(maps: Mapping, depths: Sequence[int], path: str | Path, image=None, query: int | None = None) -> Path:
    """Fig. 10. maps: {variant: (d, gh, gw)} one query's attention at the 1-based blocks `depths` (len d);
    image (H, W, 3) uint8 and query (patch index) optional: overlay and red box."""
    maps = _check_maps(maps, "maps", 3, (len(depths), None, None))
    if image is not None:
        image = _check_image(image, "image")
    if query is not None:
        for m in maps.values():
            _check_queries([query], m.shape[1:])
    fig, axes = _figure(len(maps), len(depths))
    for row, (variant, m) in enumerate(maps.items()):
        grid = m.shape[1:]
        for j, depth in enumerate(depths):
            _overlay(axes[row, j], image, m[j])
            if query is not None:
                _mark_query(axes[row, j], query, grid, grid if image is None else image.shape[:2])
            axes[0, j].set_title(f"depth {depth}", fontsize=6)
        axes[row, 0].set_ylabel(variant, fontsize=7)
    return _save(fig, path, "Fig. 10: one query across depths. Look for: local attention in shallow blocks "
                 "broadening with depth into the query's object layout.")


# ----------------------------------------------------------------------------------- Fig. 14 and scores


def plot_attention_distance(dist: Mapping, path: str | Path) -> Path:
    """Fig. 14. dist: {variant: (depth, heads)} mean attention distance in pixels; one panel per variant,
    one point per head per layer, the per-layer mean as a line."""
    dist = _check_maps(dist, "dist", 2)
    fig = Figure(figsize=(2.4 * len(dist), 2.4), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(1, len(dist), sharey=True, squeeze=False))[0]
    for ax, (variant, d) in zip(axes, dist.items(), strict=True):
        layers = np.arange(1, len(d) + 1)
        ax.scatter(np.repeat(layers, d.shape[1]), d.reshape(-1), s=6, alpha=0.7)
        ax.plot(layers, d.mean(1), color="black", linewidth=0.8)
        ax.set_title(variant, fontsize=7)
        ax.set_xlabel("layer", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("mean attention distance (px)", fontsize=7)
    return _save(fig, path, "Fig. 14: mean attention distance per head (points) and layer. Look for: CL growing "
                 "from local to global with depth, MIM staying local, SemanticMIM in between and CL-like in trend.")


SCORE_COLUMNS = ("consistency", "coverage", "evenness", "exclusivity")


def plot_consistency_completeness(df, path: str | Path) -> Path:
    """df: a pandas DataFrame with a `variant` column and `consistency`, `coverage` (and, when present,
    `evenness`, `exclusivity`) columns, one row per variant; NaN/None = undefined (K = 1) and drawn as n/a."""
    columns = list(getattr(df, "columns", []))
    missing = [c for c in ("variant", "consistency", "coverage") if c not in columns]
    if missing:
        raise InputError(f"consistency/completeness table: missing columns {missing}; got {columns}")
    if len(df) == 0:
        raise InputError("consistency/completeness table: no rows")
    scores = [c for c in SCORE_COLUMNS if c in columns]
    variants = [str(v) for v in df["variant"]]
    fig = Figure(figsize=(2.2 * len(scores), 2.4), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(1, len(scores), squeeze=False))[0]
    for ax, score in zip(axes, scores, strict=True):
        values = np.array([np.nan if v is None else float(v) for v in df[score]])
        ax.bar(range(len(values)), np.nan_to_num(values), color=[tuple(c) for c in _palette(len(values))])
        for x, v in enumerate(values):
            ax.text(x, 0 if math.isnan(v) else v, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center",
                    va="bottom", fontsize=5)
        if score == "consistency":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)  # no preference for the own class
        else:
            ax.set_ylim(0, 1.1)  # fractions
        ax.set_xticks(range(len(variants)), variants, rotation=45, ha="right", fontsize=6)
        ax.set_title(score, fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
    return _save(fig, path, "Consistency (1 = no own-class preference) and completeness (coverage of the classes "
                 "present; evenness/exclusivity of the proxies' division). Compare each variant with the random-init "
                 "floor.")


def plot_curves(curves: Mapping, path: str | Path, ylabel: str, x_label: str = "step",
                dashed: Callable[[str], bool] | None = None) -> Path:
    """curves: {name: (x (n,), values (n,))}, e.g. pretraining loss vs step, all variants overlaid; `dashed(name)`
    draws that curve dashed (a second metric of the same variant)."""
    if not isinstance(curves, Mapping) or not curves:
        raise InputError("curves: expected a non-empty dict variant -> (steps, values)")
    fig = Figure(figsize=(4.0, 2.6), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for variant, pair in curves.items():
        if len(pair) != 2:
            raise InputError(f"curves[{variant!r}]: expected (steps, values)")
        steps, values = _array(pair[0], "steps").reshape(-1), _array(pair[1], "values").reshape(-1)
        if len(steps) != len(values) or len(steps) == 0:
            raise InputError(f"curves[{variant!r}]: {len(steps)} steps but {len(values)} values (need equal, > 0)")
        style = "--" if dashed is not None and dashed(str(variant)) else "-"
        ax.plot(steps, values, style, label=str(variant), linewidth=1.0, marker="o" if len(steps) < 20 else None,
                markersize=2)
    ax.set_xlabel(x_label, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
    if x_label != "step":
        return _save(fig, path, f"{ylabel} vs {x_label}, per variant")
    return _save(fig, path, f"{ylabel} vs step per variant. Look for: every run still decreasing or flat at the end "
                 "(a run cut short says so here).")


def plot_sweep(axis_label: str, series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, *,
               reference: Mapping[str, float] | None = None, reference_label: str = "baseline",
               main: float | None = None, optimum: float | None = None, title: str = "") -> Path:
    """An ablation: one panel per metric, metric against the swept value.

    series: {metric: [(value, metric value), ...]} (the main run's point among them); reference: {metric:
    the baseline's value}, drawn as a horizontal dashed line; main: the main run's value (ringed); optimum:
    the paper's best value (a dotted vertical line)."""
    panels = {name: sorted(points) for name, points in series.items() if points}
    if not panels:
        raise InputError(f"{axis_label}: no sweep point has a metric to plot")
    fig = Figure(figsize=(2.6 * len(panels), 2.5), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, (name, points) in zip(axes, panels.items(), strict=True):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", linewidth=1.0, markersize=3, label="sweep")
        if main is not None and main in xs:
            ax.plot([main], [ys[xs.index(main)]], marker="o", markersize=8, fillstyle="none", color="black",
                    linestyle="none", label="main run")
        if reference and name in reference:
            ax.axhline(reference[name], linestyle="--", linewidth=0.8, color="gray", label=reference_label)
        if optimum is not None:
            ax.axvline(optimum, linestyle=":", linewidth=0.8, color="tab:red", label="paper's optimum")
        if len(set(xs)) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
        ax.set_xlabel(axis_label, fontsize=7)
        ax.set_ylabel(name, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    return _save(fig, path, title or f"{axis_label} ablation")
