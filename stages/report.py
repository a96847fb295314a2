"""Stage `report`: every run's numbers and maps -> `reports/` (generated, small, committed).

Table 1 beside the paper's (`table1.{md,csv,tex}`), the attention figures (paper Figs. 7–10, 14), the
consistency / completeness scores, the pretraining curves, the cost of each run, and the page that shows
them all (`reports/README.md`, never hand-edited). Reads only files other stages wrote.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field, model_validator
from safetensors import SafetensorError, safe_open

from semanticmim.errors import InputError
from semanticmim.report import (
    Cell,
    plot_attention_distance,
    plot_consistency_completeness,
    plot_curves,
    plot_depth,
    plot_patch_queries,
    plot_prefix_queries,
    plot_proxy_heatmaps,
    plot_sweep,
    write_table1,
)
from semanticmim.settings import Strict
from stages.ablation import AXES, PAPER_OPTIMUM, AblationParams, point_dir
from stages.params import load_section, read_section, repo_root_of, validate

# Table 1's columns: (protocol, metric keys to try, in order)
COLUMN_SOURCES = {
    "linear_cls": ("linear_cls", ("top1_cls",)),
    "linear_patch": ("linear_cls", ("top1_patch",)),
    "finetune_cls": ("finetune_cls", ("top1_cls",)),
    "finetune_patch": ("finetune_cls", ("top1_patch",)),
    "voc_linear_miou": ("linear_seg", ("miou",)),
    "ade_finetune_miou": ("finetune_seg", ("miou",)),
}
TABLE_ROWS = ("beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim", "mocov3", "random-init")
CAPTIONS = {
    "fig7_patch_queries.png": "Fig. 7 — attention of chosen patch queries (boxed), last block. Look for: SemanticMIM's "
                              "maps cover the query's whole object, BEiT's stay local, MoCo v3's spread over the "
                              "salient object whatever the query.",
    "fig8_proxy_queries.png": "Fig. 8 — attention of the [CLS] / each [PROXY] token over the patches, one image. Look "
                              "for: different proxies attend to different regions.",
    "fig9_proxy_heatmaps.png": "Fig. 9 — each proxy's attention averaged over many images, and which proxy owns each "
                               "patch. Look for: the proxies divide the image between them (paper: by position).",
    "fig10_depth.png": "Fig. 10 — one patch query across depths. Look for: the map grows from local to the object "
                       "with depth.",
    "fig14_attention_distance.png": "Fig. 14 — mean attention distance per head (dots) and layer (line). Look for: "
                                    "SemanticMIM's later layers attend farther than its baseline's.",
    "consistency_completeness.png": "Consistency and completeness, measured (definitions below). Compare every encoder "
                                    "with the random-init floor.",
    "fig5_num_proxy.png": "Fig. 5 — the number of [PROXY] tokens K (mask ratio fixed). Look for: a peak near the "
                          "paper's K = 8 (dotted), above the baseline (dashed).",
    "fig6_mask_ratio.png": "Fig. 6 — the mask ratio r (K fixed). Look for: a peak near the paper's r = 0.6, lower than "
                           "the baseline's 0.4 would suggest.",
    "fig_img_mask_ratio.png": "Beyond the paper (its §6): the IMG stream hides its own share of patches while MASK "
                              "keeps its ratio; the ringed point is the main run (IMG hides exactly the MASK "
                              "patches). Look for: whether decoupling the two ratios helps.",
    "fig_probe_vs_epoch.png": "Beyond the paper: linear-probe top-1 of the encoder snapshots saved during "
                              "pretraining (solid: CLS, dashed: patch). Look for: whether a SemanticMIM-vs-baseline "
                              "gap is opening or closing with more pretraining.",
    "pretraining_loss.png": "Pretraining loss against step, every variant (losses of different targets are not "
                            "comparable across methods; within a method, lower is better).",
}


class ReportParams(Strict):
    """`report`: what the page says about the profile and which encoders its figures show."""

    profile: str = "default"
    datasets: str = "embedded classification and segmentation sets (generated, no download)"
    paper_scale: bool = False  # flag cells more than 1 pt from the paper's
    figure_encoders: tuple[str, ...] = ("mocov3", "beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim")
    attention_encoders: tuple[str, ...] = ("mocov3", "beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim",
                                           "random-init")
    probe_curve_encoders: tuple[str, ...] = ()  # the probe-curve stages: linear probe vs pretraining epoch
    attention: dict = Field(default_factory=dict)  # stages.attention.AttentionParams
    floors: dict = Field(default_factory=dict)  # stages.floors.FloorParams
    departures: list[dict] = Field(default_factory=list)  # {value, paper, reason}: this profile vs the paper


class SeedsParams(Strict):
    """`seeds`: Table 1's spread. The main runs use `pretrain.run.seed`; each seed in `extra` pretrains
    `variants` again with that seed (`runs/pretrain/<variant>/seed<seed>`) and evaluates them by
    `protocols` (`runs/eval/<variant>/seed<seed>/<protocol>`); Table 1 then shows mean ± std over
    1 + len(extra) seeds for those cells."""

    extra: tuple[int, ...] = ()  # seeds besides the main runs' (which are reused, never listed)
    variants: tuple[str, ...] = ("beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim")
    protocols: tuple[Literal["linear_cls", "linear_seg", "finetune_cls", "finetune_seg"], ...] = ("linear_cls",)

    @model_validator(mode="after")
    def _distinct(self) -> SeedsParams:
        if len(set(self.extra)) != len(self.extra):
            raise ValueError(f"extra: {list(self.extra)} lists a seed twice")
        unknown = sorted(set(self.variants) - set(TABLE_ROWS))
        if unknown:
            raise ValueError(f"variants: {unknown} are not Table 1 rows {list(TABLE_ROWS[:5])}")
        return self


def load_seeds(params_file: Path) -> SeedsParams:
    """The `seeds` section; none of its seeds may be the main runs' own (`pretrain.run.seed`)."""
    seeds = load_section(params_file, "seeds", optional=True)
    if not seeds.extra:
        return seeds
    main = (read_section(params_file, "pretrain").get("run") or {}).get("seed", 0)
    if main in seeds.extra:
        raise InputError(f"{params_file}: seeds.extra: {main} is the main runs' seed (pretrain.run.seed); list only "
                         "the other seeds")
    return seeds


@dataclass
class Sources:
    """Where the report reads; paths relative to the project root."""

    root: Path

    def eval_root(self, encoder: str) -> Path:
        return self.root / "runs" / "eval" / encoder

    def eval_dir(self, encoder: str, protocol: str) -> Path:
        return self.eval_root(encoder) / protocol

    def pretrain_dir(self, encoder: str) -> Path:
        return self.root / "runs" / "pretrain" / encoder

    def attention_dir(self, encoder: str) -> Path:
        return self.root / "runs" / "attention" / encoder

    def seed_eval_dir(self, seed: int, encoder: str, protocol: str) -> Path:
        return self.eval_root(encoder) / f"seed{seed}" / protocol

    def pixels_dir(self) -> Path:
        return self.root / "runs" / "floors" / "raw-pixels"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def cell_source(run_dir: Path, run: dict | None, root: Path, pretrain: dict | None) -> dict:
    source = {"metrics": relative(run_dir / "metrics.json", root), "run": relative(run_dir / "run.json", root)}
    if run:
        source["commit"] = run.get("git_commit") or ""
        encoder = run.get("params", {}).get("encoder") or {}
        if encoder.get("sha256"):
            source["encoder_sha256"] = encoder["sha256"]
        preset = run.get("params", {}).get("settings", {}).get("preset")
        if preset:
            source["preset"] = str(preset)
    tokenizer = (pretrain or {}).get("params", {}).get("tokenizer_identity")
    if tokenizer:
        source.update(tokenizer=tokenizer.get("kind", ""), tokenizer_sha256=tokenizer.get("sha256", ""))
    return source


def metric_value(metrics: dict | None, keys: tuple[str, ...]) -> tuple[float | None, str]:
    """The first of `keys` in a metrics file, at the top or under a mode (`paper`, `cached`: the linear
    probe writes its numbers under the mode that produced them); -> (value, mode or "")."""
    for key in keys:
        if metrics and isinstance(metrics.get(key), int | float):
            return float(metrics[key]), ""
        for mode in ("paper", "cached"):
            group = (metrics or {}).get(mode)
            if isinstance(group, dict) and isinstance(group.get(key), int | float):
                return float(group[key]), f"{mode} mode"
    return None, ""


def seed_values(sources: Sources, seeds: SeedsParams, row: str, protocol: str, keys: tuple[str, ...],
                main: float) -> tuple[float, float | None, int, str]:
    """The main run's value with the same cell of every extra seed: (mean, std or None, seeds, note)."""
    if row not in seeds.variants or protocol not in seeds.protocols or not seeds.extra:
        return main, None, 1, ""
    values = [main]
    for seed in seeds.extra:
        value, _ = metric_value(read_json(sources.seed_eval_dir(seed, row, protocol) / "metrics.json"), keys)
        if value is not None:
            values.append(value)
    expected = 1 + len(seeds.extra)
    note = "" if len(values) == expected else f"{len(values)} of {expected} seeds have a result"
    if len(values) == 1:
        return main, None, 1, note
    return statistics.fmean(values), statistics.stdev(values), len(values), note


def table_cells(sources: Sources, protocols: list[str], encoders: list[str],
                seeds: SeedsParams | None = None) -> list[Cell]:
    """One cell per (row, column): the value (mean ± std over seeds where `seeds` adds some), or a note that
    says why there is none."""
    seeds = seeds or SeedsParams()
    cells = []
    for row in TABLE_ROWS:
        pretrain = read_json(sources.pretrain_dir(row) / "run.json")
        for column, (protocol, keys) in COLUMN_SOURCES.items():
            run_dir = sources.eval_dir(row, protocol)
            metrics, run = read_json(run_dir / "metrics.json"), read_json(run_dir / "run.json")
            value, mode = metric_value(metrics, keys)
            spread, count, note = None, 1, ""
            if value is not None:
                value, spread, count, note = seed_values(sources, seeds, row, protocol, keys, value)
            if value is None:
                if protocol not in protocols:
                    note = f"not run at this profile: `{protocol}` is not in eval.protocols"
                elif row not in encoders:
                    note = f"not run at this profile: `{row}` is not in eval.encoders"
                elif metrics is None:
                    note = f"missing: {relative(run_dir / 'metrics.json', sources.root)} was not written"
                else:
                    note = f"missing: no {' / '.join(keys)} in {relative(run_dir / 'metrics.json', sources.root)}"
            source = cell_source(run_dir, run, sources.root, pretrain) if value is not None else {}
            if mode:
                source["preset"] = f"{source['preset']}, {mode}" if source.get("preset") else mode
            cells.append(Cell(row, column, value, spread=spread, seeds=count, note=note, source=source))
    pixels = read_json(sources.pixels_dir() / "metrics.json")
    pixel_run = read_json(sources.pixels_dir() / "run.json")
    for column in ("linear_cls", "linear_patch"):
        value = float(pixels["top1"]) if pixels and "top1" in pixels else None
        source = cell_source(sources.pixels_dir(), pixel_run, sources.root, None) if value is not None else {}
        cells.append(Cell("raw-pixels", column, value, note="" if value is not None else "missing: floor not run",
                          source=source))
    for column in ("finetune_cls", "finetune_patch"):
        cells.append(Cell("raw-pixels", column, None, note="n/a: the raw-pixel floor is a linear probe"))
    return cells


# ------------------------------------------------------------------------------------------ ablations

# what each sweep protocol contributes to its figure: (label, metric keys)
SWEEP_METRICS = {
    "linear_cls": (("linear CLS top-1 (%)", ("top1_cls",)), ("linear patch top-1 (%)", ("top1_patch",))),
    "finetune_cls": (("fine-tune top-1 (%)", ("top1_cls",)),),
}
SWEEP_FIGURES = {"num_proxy": ("fig5_num_proxy", "number of [PROXY] tokens K"),
                 "mask_ratio": ("fig6_mask_ratio", "mask ratio r"),
                 "img_mask_ratio": ("fig_img_mask_ratio", "IMG mask ratio (MASK ratio of the main run)")}


def protocol_values(folder: Path, protocols: tuple[str, ...]) -> dict[str, float]:
    """{figure label: value} of the sweep protocols evaluated in `folder/<protocol>/`."""
    values = {}
    for protocol in protocols:
        metrics = read_json(folder / protocol / "metrics.json")
        for label, keys in SWEEP_METRICS[protocol]:
            value, _ = metric_value(metrics, keys)
            if value is not None:
                values[label] = value
    return values


def main_point(sources: Sources, ablation: AblationParams, axis: str) -> float | None:
    """The main run's value on `axis` (what it actually ran, from its run.json); on the IMG axis, its
    mask ratio (the main run's IMG stream hides exactly the masked patches)."""
    run = read_json(sources.pretrain_dir(ablation.base) / "run.json") or {}
    recipe = run.get("params", {}).get("resolved_recipe", {})
    return recipe.get("mask_ratio" if axis == "img_mask_ratio" else axis)


def sweep_rows(sources: Sources, ablation: AblationParams, axis: str) -> list[dict]:
    """One row per point of `axis` (the main run's included): value, main, then one column per metric;
    a point not evaluated yet has only its value and a `missing` note."""
    main = main_point(sources, ablation, axis)
    points = [(main, sources.eval_root(ablation.base), True)] if main is not None else []
    points += [(value, point_dir(sources.root, axis, value), False) for value in ablation.points(axis)]
    rows = []
    for value, folder, is_main in points:
        values = protocol_values(folder, ablation.protocols)
        missing = "" if values else f"missing: no metrics under {relative(folder, sources.root)}"
        rows.append({"value": value, "main": is_main, **values, "note": missing})
    return sorted(rows, key=lambda row: row["value"])


def sweep_figures(sources: Sources, ablation: AblationParams, out: Path) -> list[tuple[str, pd.DataFrame]]:
    """`ablation_<axis>.csv` and the figure of every axis with points; -> [(figure name, its table)]."""
    written = []
    reference = protocol_values(sources.eval_root(ablation.baseline), ablation.protocols)
    for axis in AXES:
        if not ablation.points(axis):
            continue
        rows = sweep_rows(sources, ablation, axis)
        frame = pd.DataFrame(rows)
        stem, label = SWEEP_FIGURES[axis]
        frame.to_csv(out / f"ablation_{axis}.csv", index=False, float_format="%.2f")
        series = {name: [(row["value"], row[name]) for row in rows if isinstance(row.get(name), float)]
                  for name in frame.columns if name not in ("value", "main", "note")}
        if not any(series.values()):
            continue
        main = next((row["value"] for row in rows if row["main"]), None)
        title = (f"{ablation.base}: {label}" + (f"; {ablation.note}" if ablation.note else "")
                 + f". Dashed: {ablation.baseline}")
        plot_sweep(label, series, out / f"{stem}.png", reference=reference, reference_label=ablation.baseline,
                   main=main, optimum=PAPER_OPTIMUM.get(axis), title=title)
        written.append((f"{stem}.png", frame))
    return written


# ---------------------------------------------------------------------------------------- figures


def load_maps(sources: Sources, encoders: list[str]) -> dict[str, dict]:
    """{encoder: {name: array, "chosen": {...}}} for the encoders whose attention analysis exists."""
    found = {}
    for encoder in encoders:
        path = sources.attention_dir(encoder) / "maps.safetensors"
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), framework="np") as handle:
                found[encoder] = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
                found[encoder]["chosen"] = json.loads((handle.metadata() or {})["chosen"])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: not the attention stage's maps ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else 'no chosen metadata'}); rerun "
                             "the attention stage") from None
    return found


def write_figures(maps: dict[str, dict], figure_encoders: list[str], out: Path) -> list[str]:
    """The attention figures of the encoders at hand; -> the file names written."""
    shown = [e for e in figure_encoders if e in maps]
    if not shown:
        return []
    first = maps[shown[0]]
    chosen = first["chosen"]
    grid = tuple(chosen["grid"])
    written = []
    plot_patch_queries(first["images"], {e: maps[e]["patch_queries"] for e in shown}, chosen["queries"], grid,
                       out / "fig7_patch_queries.png")
    written.append("fig7_patch_queries.png")
    prefixed = [e for e in shown if "prefix_queries" in maps[e]]
    if prefixed:
        plot_prefix_queries(first["images"][0], {e: maps[e]["prefix_queries"] for e in prefixed},
                            out / "fig8_proxy_queries.png")
        plot_proxy_heatmaps({e: maps[e]["proxy_heatmaps"] for e in prefixed}, out / "fig9_proxy_heatmaps.png",
                            n_images=int(chosen["heatmap_images"]))
        written += ["fig8_proxy_queries.png", "fig9_proxy_heatmaps.png"]
    plot_depth({e: maps[e]["depth"] for e in shown}, chosen["depths"], out / "fig10_depth.png",
               image=first["images"][0], query=chosen["queries"][0])
    plot_attention_distance({e: maps[e]["distance"] for e in maps}, out / "fig14_attention_distance.png")
    return [*written, "fig10_depth.png", "fig14_attention_distance.png"]


def consistency_table(sources: Sources, encoders: list[str], out: Path) -> pd.DataFrame | None:
    rows = []
    for encoder in encoders:
        metrics = read_json(sources.attention_dir(encoder) / "metrics.json")
        if metrics is not None:
            rows.append({"variant": encoder, **metrics})
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    for column in ("coverage", "evenness", "exclusivity"):
        if column not in frame:
            frame[column] = float("nan")
    frame.to_csv(out / "consistency_completeness.csv", index=False, float_format="%.4f")
    plot_consistency_completeness(frame, out / "consistency_completeness.png")
    return frame


def read_curve(path: Path) -> tuple[list[float], list[float]] | None:
    """A dvclive TSV (step, value) -> its columns."""
    if not path.is_file():
        return None
    with path.open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows:
        return None
    name = next(key for key in rows[0] if key not in ("step", "timestamp"))
    return [float(r["step"]) for r in rows], [float(r[name]) for r in rows]


def probe_curves(sources: Sources, encoders: list[str], out: Path) -> bool:
    """fig_probe_vs_epoch.png from each encoder's probe-curve stage (curve.tsv); False when none ran."""
    curves = {}
    for encoder in encoders:
        path = sources.eval_root(encoder) / "probe_curve" / "curve.tsv"
        if not path.is_file():
            continue
        with path.open() as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        for column, label in (("top1_cls", "CLS"), ("top1_patch", "patch")):
            points = [(float(r["epoch"]), float(r[column])) for r in rows if r.get(column)]
            if points:
                curves[f"{encoder} {label}"] = ([p[0] for p in points], [p[1] for p in points])
    if curves:
        plot_curves(curves, out / "fig_probe_vs_epoch.png", "linear-probe top-1 (%)", x_label="pretraining epoch",
                    dashed=lambda name: name.endswith(" patch"))
    return bool(curves)


def pretraining_curves(sources: Sources, variants: list[str], out: Path) -> bool:
    curves = {}
    for variant in variants:
        curve = read_curve(sources.pretrain_dir(variant) / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv")
        if curve is not None:
            curves[variant] = curve
    if curves:
        plot_curves(curves, out / "pretraining_loss.png", "training loss")
    return bool(curves)


def cost_rows(sources: Sources, variants: list[str], protocols: list[str], encoders: list[str]) -> list[dict]:
    """Wall time, img/s, peak memory and device of every run that recorded them."""
    rows = []
    for name, folder in [(f"pretrain {v}", sources.pretrain_dir(v)) for v in variants] + [
            (f"eval {e} {p}", sources.eval_dir(e, p)) for e in encoders for p in protocols]:
        metrics, run = read_json(folder / "metrics.json") or {}, read_json(folder / "run.json") or {}
        seconds = metrics.get("wall_time_s") or (run.get("params", {}).get("timing") or {}).get("total_s")
        if seconds is None:
            continue
        device = run.get("device", {})
        rows.append({"run": name, "wall_s": seconds, "img_per_s": metrics.get("img_per_s"),
                     "peak_memory_mb": metrics.get("peak_memory_mb"),
                     "device": f"{device.get('type', '?')} {device.get('name', '')} ({device.get('torch_threads')} "
                               "threads)"})
    return rows


# ------------------------------------------------------------------------------------------ the page


DEFINITIONS = """\
**Consistency** (how much of a patch query's attention stays on its own class, relative to that class's
area; 1.0 = no preference). For each labelled patch query q of class c (its majority label), q's
last-block attention over the patch keys (each head's row renormalised over patch keys, heads averaged),
restricted to labelled patches: consistency(q) = (mass on patches of class c) / (fraction of labelled
patches of class c). Reported: the mean over queries and images. Purely local attention also scores above
1, so read it beside the attention distance.

**Completeness** (do the [CLS]/[PROXY] tokens between them attend to every class present?). Per image with
at least two labelled classes, each prefix token t's attention over the labelled patches, a_c = the area of
class c, m_tc = t's mass on c; excess e_tc = (m_tc − a_c) / (1 − a_c) (0 = its uniform share, 1 = all of
t's mass on c). *Coverage*: the fraction of present classes with max_t e_tc ≥ 0.5, averaged over images
(uniform attention 0; all tokens on one class 1/#classes; tokens each on a different class 1).
*Evenness* (K ≥ 2): the entropy of which token attends most to each patch, over log K (1 = the proxies
own equal shares). *Exclusivity* (K ≥ 2): the mutual information between token and patch, over log K
(1 = disjoint regions, 0 = identical maps). Evenness alone is high for near-identical noisy maps (the
argmax is noise): read it next to exclusivity. Undefined (n/a) for one prefix token.
"""


def page(params: ReportParams, figures: list[str], table_md: str, consistency: pd.DataFrame | None,
         costs: list[dict], curves: bool, sweeps: list[tuple[str, pd.DataFrame]] | None = None,
         probe_curve: bool = False) -> str:
    lines = ["# SemanticMIM reproduction: the report", "",
             "Generated by the `report` stage of `dvc repro` (`stages/report.py`); do not edit by hand.", "",
             f"Profile: **{params.profile}**. Datasets: {params.datasets}.", ""]
    if params.departures:
        lines += ["## How this profile departs from the paper", "", "| value | paper | reason |", "|---|---|---|"]
        lines += [f"| {d.get('value', '')} | {d.get('paper', '')} | {d.get('reason', '')} |" for d in params.departures]
        lines.append("")
    lines += ["## Table 1", "", table_md.strip(), ""]
    if figures:
        lines += ["## Attention", ""]
        for name in figures:
            lines += [f"![{name}]({name})", "", CAPTIONS.get(name, ""), ""]
    if consistency is not None:
        lines += ["## Consistency and completeness, measured", "", "![consistency](consistency_completeness.png)", "",
                  CAPTIONS["consistency_completeness.png"], "",
                  markdown_table(consistency), "", DEFINITIONS]
    if sweeps:
        lines += ["## Ablations", "", "Each point pretrains `ablation.base` with one recipe value changed; the ringed "
                  "point is the main run, the dashed line the baseline variant, the dotted line the paper's optimum. "
                  "Values per point: `ablation_<axis>.csv`.", ""]
        for name, frame in sweeps:
            lines += [f"![{name}]({name})", "", CAPTIONS.get(name, ""), "", markdown_table(frame), ""]
    if probe_curve:
        lines += ["## Linear probe against pretraining epoch", "", "![probe vs epoch](fig_probe_vs_epoch.png)", "",
                  CAPTIONS["fig_probe_vs_epoch.png"], ""]
    if curves:
        lines += ["## Pretraining", "", "![loss](pretraining_loss.png)", "", CAPTIONS["pretraining_loss.png"], ""]
    if costs:
        lines += ["## Cost of each run", "", "| run | wall time (s) | img/s | peak memory (MB) | device |",
                  "|---|---|---|---|---|"]
        for row in costs:
            speed = f"{row['img_per_s']:.0f}" if row.get("img_per_s") else ""
            memory = f"{row['peak_memory_mb']:.0f}" if row.get("peak_memory_mb") else ""
            lines.append(f"| {row['run']} | {row['wall_s']:.1f} | {speed} | {memory} | {row['device']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def markdown_table(frame: pd.DataFrame) -> str:
    def text(value) -> str:
        return "n/a" if isinstance(value, float) and value != value else (
            f"{value:.3f}" if isinstance(value, float) else str(value))

    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns)
    body = ("| " + " | ".join(text(v) for v in row) + " |" for row in frame.itertuples(index=False))
    return "\n".join([header, *body])


def run(params_file: Path, out: Path) -> list[str]:
    """Write every report file into `out`; -> their names."""
    values = read_section(params_file, "report")
    params = validate(ReportParams, values, params_file, "report")
    evaluation = read_section(params_file, "eval")
    protocols, encoders = list(evaluation.get("protocols", [])), list(evaluation.get("encoders", []))
    root = repo_root_of(Path(params_file))
    sources = Sources(root)
    out.mkdir(parents=True, exist_ok=True)
    header = {"profile": params.profile, "datasets": params.datasets}
    seeds = load_seeds(params_file)
    if seeds.extra:
        header["seeds"] = (f"{1 + len(seeds.extra)} (the main runs' and {list(seeds.extra)}) for "
                           f"{', '.join(seeds.variants)} × {', '.join(seeds.protocols)}; other cells one seed")
    paths = write_table1(table_cells(sources, protocols, encoders, seeds), out, header, params.paper_scale, root)
    figures = write_figures(load_maps(sources, list(params.attention_encoders)), list(params.figure_encoders), out)
    consistency = consistency_table(sources, list(params.attention_encoders), out)
    variants = [v for v in TABLE_ROWS if v != "random-init"]
    curves = pretraining_curves(sources, variants, out)
    costs = cost_rows(sources, variants, protocols, encoders)
    sweeps = sweep_figures(sources, load_section(params_file, "ablation", optional=True), out)
    probe_curve = probe_curves(sources, list(params.probe_curve_encoders), out)
    text = page(params, figures, paths["md"].read_text(), consistency, costs, curves, sweeps, probe_curve)
    tmp = out / ".README.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "README.md")
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
