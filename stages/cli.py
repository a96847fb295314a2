"""`semanticmim` command line: one command per pipeline stage plus tools (export, bench, data, targets).

Heavy imports happen inside the commands so that `--help` is fast and `bench` runs where only torch,
timm, typer and rich are installed.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from semanticmim.errors import InputError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="SemanticMIM reproduction pipeline: pretrain, evaluate, export and benchmark.",
)
targets_app = typer.Typer(no_args_is_help=True, help="Pretraining targets: DALL-E weights, the dVAE tokenizer.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the embedded one, inspect and prepare.")
floor_app = typer.Typer(no_args_is_help=True, help="Table 1's floors: a random-init encoder, a raw-pixel probe.")
app.add_typer(targets_app, name="targets")
app.add_typer(data_app, name="data")
ablation_app = typer.Typer(no_args_is_help=True, help="The ablation sweeps (paper Figs. 5 and 6): one point each.")
app.add_typer(floor_app, name="floor")
app.add_typer(ablation_app, name="ablation")

err_console = Console(stderr=True)


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bad-input exceptions into a one-line `error: ...` on stderr and exit code 2.

    Bad input is an InputError or a missing file; also an image a stage decodes outside a skipping Dataset
    (`UnreadableImage`, whose message names the file), and settings a stage builds without
    `stages.params.validate` (pydantic's ValidationError, described as `validate` does). An InputError a
    DataLoader worker raised is shown by its own message, not torch's worker traceback. The message is
    printed as text, never as rich markup (a path like `data/[v2]/` stays as it is). Nothing is imported
    until an error is being shown, so `--help` stays fast."""

    def one_line(error: Exception) -> str | None:
        """The message to show, or None when `error` is not bad input (a bug: its traceback is shown)."""
        import sys

        decode, pydantic = sys.modules.get("semanticmim.data.decode"), sys.modules.get("pydantic")
        if pydantic is not None and isinstance(error, pydantic.ValidationError):
            from semanticmim.settings import describe

            return describe(error, error.title)
        unreadable = decode.UnreadableImage if decode is not None else ()
        if not isinstance(error, (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, unreadable)):
            return None
        text = str(error)
        if text.startswith("Caught ") and "Original Traceback" in text:  # torch re-raised a worker's error
            last = text.strip().splitlines()[-1]
            text = last.removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")
        return text

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Exception as error:
            message = one_line(error)
            if message is None:
                raise
            from rich.markup import escape

            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


def run_training(start: Callable[[], dict]) -> dict:
    """Run a training stage: NaN loss exits 1, Ctrl-C (after its checkpoint is saved) exits 130."""
    from semanticmim.engine.loop import TrainingDiverged

    try:
        return start()
    except TrainingDiverged as error:
        err_console.print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: checkpoint saved; rerun the same command to resume", highlight=False)
        raise typer.Exit(code=130) from None


# ----------------------------------------------------------------------------------------------- bench


@app.command("bench")
@friendly_errors
def bench_command(
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    preset: Annotated[str, typer.Option(help="tiny (32 px, 192-d x 6) or vit-b (ViT-B/16 at 224)")] = "tiny",
    batch_size: Annotated[int | None, typer.Option(help="Images per step (default depends on preset/device).")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per round.")] = 3,
    rounds: Annotated[int, typer.Option(help="Round-robin rounds; the median round is kept.")] = 3,
    variant: Annotated[list[str] | None, typer.Option(help="Only these variants (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as a JSON list.")] = False,
    loop: Annotated[bool, typer.Option("--loop", help="Whole training steps through the pretrain stage (data, "
                                       "targets, forward/backward, optimizer), one epoch per variant.")] = False,
    params: Annotated[Path, typer.Option(help="--loop: the params file whose `pretrain` section is run.")] = Path(
        "params.yaml"),
    data: Annotated[Path | None, typer.Option(help="Measure decode + augmentation img/s per core of every data "
                                              "pipeline on the images under this folder instead.")] = None,
    sample_photos: Annotated[int | None, typer.Option(
        help="Measure the data pipelines on N ImageNet-like JPEGs (500×375, ≈4.7 bits per pixel) made from "
             "scikit-image's bundled photographs in a temporary folder (no download).")] = None,
    img_size: Annotated[int, typer.Option(help="--data/--sample-photos: output size of the pipelines.")] = 224,
    limit: Annotated[int, typer.Option(help="--data: use at most this many images.")] = 500,
    seconds: Annotated[float, typer.Option(help="--data/--sample-photos: CPU seconds per pipeline.")] = 2.0,
) -> None:
    """Training-step speed of every variant and of timm's ViT, measured in one run, with ratios.

    With --loop, whole training steps through the pretrain stage; with --data or --sample-photos, the
    data pipelines."""
    if data is not None and sample_photos is not None:
        raise InputError("--data and --sample-photos exclude each other; give one of them")
    if data is not None or sample_photos is not None:
        from stages.bench.data import collect_images, measure_pipelines

        if sample_photos is None:
            records, skipped = measure_pipelines(collect_images(data, limit), img_size, seconds=seconds)
            for path in skipped:
                err_console.print(f"skipped: {path}: not a readable image", highlight=False, soft_wrap=True)
        else:
            import tempfile

            from stages.bench.photos import write_photo_jpegs

            if sample_photos < 1:
                raise InputError(f"--sample-photos: expected at least 1 image, got {sample_photos}")
            with tempfile.TemporaryDirectory(prefix="semanticmim-photos-") as folder:
                records, _ = measure_pipelines(write_photo_jpegs(folder, sample_photos), img_size, seconds=seconds)
        if as_json:
            print_json(records)
            return
        typer.echo(f"{records[0]['bits_per_pixel']:.2f} bits per pixel in the files; img/s per core:")
        for r in records:
            ratio = f"  ({r['vs_reference']:.2f}× maskfeat-reference)" if "vs_reference" in r else ""
            typer.echo(f"{r['pipeline']:>18} ({r['source']}): {r['img_per_s_per_core']:8.1f}{ratio}")
        return
    if loop:
        from stages.bench import pipeline

        records = pipeline.run(params, variant, "cpu" if device == "cpu" else device)
        if as_json:
            print_json(records)
            return
        for r in records:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["time_share"].items())
            typer.echo(f"{r['variant']:>22}: {r['img_per_s']:8.1f} img/s  ({shares})")
        return
    from stages.bench.steps import run_benchmark

    records = run_benchmark(device, preset, batch_size, steps, rounds, variant)
    if as_json:
        print_json(records)
        return
    from rich.table import Table

    table = Table(title=f"bench: {preset} on {device}, batch {records[0]['batch_size']}")
    for column in ("variant", "step_ms", "img_per_s", "GFLOP/step", "MFU", "img/s vs timm", "step vs baseline"):
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(r["variant"], f"{r['step_ms']:.1f}", f"{r['img_per_s']:.1f}", f"{r['flops_per_step'] / 1e9:.1f}",
                      f"{r['mfu']:.1%}", str(r.get("img_per_s_vs_timm", "")), str(r.get("step_vs_baseline", "")))
    Console().print(table)
    Console().print(f"measured matmul peak: {records[0]['peak_flops'] / 1e9:.1f} GFLOP/s")


# ---------------------------------------------------------------------------------------------- export


@app.command("export")
@friendly_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="Pretrained model (model.safetensors) or MoCo v3 model.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write model.safetensors + config.json into.")],
    to: Annotated[str, typer.Option("--to", help="Target format; only 'timm' is supported.")] = "timm",
) -> None:
    """Export the encoder of a pretrained model so that `timm.create_model` loads it (strict)."""
    from semanticmim.models.export import export_timm

    if to != "timm":
        raise InputError(f"--to {to!r} is not supported; expected 'timm'")
    config = export_timm(checkpoint, out_dir)
    typer.echo(f"wrote {out_dir}/model.safetensors and config.json ({config['architecture']})")


# -------------------------------------------------------------------------------------------- pretrain


@app.command("pretrain")
@friendly_errors
def pretrain_command(
    variant: Annotated[str, typer.Argument(help="beit | beit-semanticmim | maskfeat | maskfeat-semanticmim | mocov3")],
    params: Annotated[Path, typer.Option(help="params.yaml-shaped file; its `pretrain` section is read.")] = Path(
        "params.yaml"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/pretrain/VARIANT).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bar; one line per epoch.")] = False,
    discard_stale_checkpoints: Annotated[bool, typer.Option(
        help="Delete checkpoints written with other settings instead of refusing them (dvc.yaml uses it).")] = False,
    set_values: Annotated[list[str] | None, typer.Option(
        "--set", help="KEY=VALUE: a recipe value for this run on top of the profile's (an ablation point, "
        "e.g. --set num_proxy=4); repeatable.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed instead of pretrain.run.seed (the seeds axis).")] = None,
) -> None:
    """Pretrain one variant; rerunning the same command after a kill resumes from the last checkpoint."""
    from stages import pretrain

    out = out or Path("runs/pretrain") / variant
    overrides = pretrain.parse_overrides(set_values or [])
    metrics = run_training(lambda: pretrain.run(variant, params, out, quiet, device, discard_stale_checkpoints,
                                                overrides, seed))
    typer.echo(f"{variant}: final loss {metrics['final_loss']:.4f}, {metrics['img_per_s']:.0f} img/s")


@ablation_app.command("pretrain")
@friendly_errors
def ablation_pretrain_command(
    axis: Annotated[str, typer.Argument(help="num_proxy | mask_ratio | img_mask_ratio")],
    value: Annotated[str, typer.Argument(help="The point's value, e.g. 4 or 0.5.")],
    params: Annotated[Path, typer.Option(help="params.yaml-shaped file (`ablation`, `pretrain`).")] = Path(
        "params.yaml"),
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/ablation/AXIS/VALUE/pretrain).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bar; one line per epoch.")] = False,
    discard_stale_checkpoints: Annotated[bool, typer.Option(
        help="Delete checkpoints written with other settings instead of refusing them (dvc.yaml uses it).")] = False,
) -> None:
    """Pretrain one ablation point: `ablation.base` with AXIS = VALUE (evaluate it with `semanticmim eval`)."""
    from stages import ablation, pretrain

    if axis not in ablation.AXES:
        raise InputError(f"axis {axis!r}: expected one of {', '.join(ablation.AXES)}")
    point = pretrain.parse_overrides([f"{axis}={value}"])
    base = ablation.load(params).base
    out = out or Path("runs/ablation") / axis / value / "pretrain"
    metrics = run_training(lambda: pretrain.run(base, params, out, quiet, device, discard_stale_checkpoints, point))
    typer.echo(f"ablation {axis}={value}: final loss {metrics['final_loss']:.4f}, {metrics['img_per_s']:.0f} img/s")


# ---------------------------------------------------------------------------------------------- data


@data_app.command("inspect")
@friendly_errors
def data_inspect_command(
    root: Annotated[Path, typer.Argument(help="Dataset root folder.")],
    layout: Annotated[
        str, typer.Option("--format", help="imagefolder | imagenet | voc | ade20k | pairs")
    ] = "imagefolder",
    split: Annotated[
        list[str] | None, typer.Option("--split", help="Split(s) to read (repeatable); default: all found.")
    ] = None,
    void_label: Annotated[
        int | None, typer.Option(help="pairs: raw label value meaning 'unlabelled' (→ ignore).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Threads decoding images.")] = 8,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Read every image (and label) of a dataset: counts, classes, sizes, unreadable files, problems.

    Exits 0 when the dataset is usable, 1 when it is not (unreadable files alone are skipped, not fatal).
    """
    from rich.progress import Progress

    from semanticmim.data.inspect import inspect_dataset

    if void_label is not None and layout != "pairs":
        raise InputError(f"--void-label applies to --format pairs only (got --format {layout})")
    options = {"void_label": void_label} if void_label is not None else {}
    with Progress(console=err_console, transient=True, disable=json_output or not err_console.is_terminal) as progress:
        task = progress.add_task("reading images", total=None)
        report = inspect_dataset(
            root, layout, split or None, workers, lambda done: progress.advance(task, done), **options
        )
    if json_output:
        print_json(report.to_dict())
    else:
        _print_dataset_report(report)
    if not report.usable:
        first = report.problems[0] if report.problems else "no readable images"
        err_console.print(
            f"[bold red]error:[/] {root} is not usable: {first} ({len(report.problems)} problem(s))",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=1)


def _print_dataset_report(report: Any) -> None:
    from rich.table import Table

    console = Console()
    table = Table(title=f"{report.layout} dataset at {report.root}")
    for column in ("split", "listed", "readable", "skipped"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, stats in report.splits.items():
        table.add_row(name, str(stats["listed"]), str(stats["images"]), str(stats["skipped"]))
    console.print(table)
    names = ", ".join(report.classes[:12]) + (", ..." if len(report.classes) > 12 else "")
    console.print(f"classes: {len(report.classes)} ({names})", highlight=False)
    if report.image_size:
        sizes = report.image_size
        console.print(
            f"image size (w x h): min {sizes['min']}, max {sizes['max']}, mean {sizes['mean']}, "
            f"most common {sizes['most_common']}",
            highlight=False,
        )
    for entry in report.skipped[:10]:
        console.print(f"skipped: {entry['path']}: {entry['reason']}", highlight=False, soft_wrap=True)
    for problem in report.problems[:10]:
        console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    hidden = max(0, len(report.skipped) - 10) + max(0, len(report.problems) - 10)
    if hidden:
        console.print(f"... and {hidden} more (see --json)")


@data_app.command("prepare")
@friendly_errors
def data_prepare_command(
    kind: Annotated[str | None, typer.Argument(help="embedded | imagefolder | imagenet | voc | ade20k | pairs")] = None,
    root: Annotated[Path | None, typer.Argument(help="Dataset root (not for 'embedded').")] = None,
    out: Annotated[Path | None, typer.Option(help="embedded: output folder; others: the manifest JSON.")] = None,
    params: Annotated[Path | None, typer.Option(help="Read everything from this file's `data` section.")] = None,
    image_size: Annotated[int, typer.Option(help="embedded: image side in px.")] = 64,
    train: Annotated[int, typer.Option(help="embedded: training images.")] = 5000,
    val: Annotated[int, typer.Option(help="embedded: validation images.")] = 1000,
    seed: Annotated[int, typer.Option(help="embedded: generator seed.")] = 0,
    workers: Annotated[int | None, typer.Option(help="Processes (embedded) or threads (manifest).")] = None,
    split: Annotated[
        list[str] | None, typer.Option("--split", help="manifest: split(s) to include; default: all found.")
    ] = None,
    shards: Annotated[bool, typer.Option(help="imagenet/imagefolder: write pre-resized WebDataset shards of the "
                                         "first --split (default train) into --out instead of a manifest.")] = False,
    max_side: Annotated[int, typer.Option(help="--shards: longer side of the stored JPEGs.")] = 320,
) -> None:
    """Write the embedded dataset, a manifest (counts + content fingerprint) of an external one, or shards."""
    if params is not None:
        if kind is not None or out is not None:
            raise InputError("--params reads kind, root and out from the file's `data` section; give no others")
        from stages import prepare

        typer.echo(prepare.run(params))
        return
    if kind is None or out is None:
        raise InputError("give KIND and --out (e.g. `prepare embedded --out data/embedded`), or --params FILE")
    if kind == "embedded":
        from semanticmim.data.embedded import generate_embedded

        if root is not None:
            raise InputError(f"prepare embedded takes no ROOT (got {root}); use --out DIR")
        meta = generate_embedded(out, image_size, train, val, seed, workers)
        typer.echo(f"wrote {out}: {meta['splits']} images of {image_size} px, {len(meta['classes'])} classes")
        return
    from semanticmim.data.inspect import write_manifest

    if root is None:
        raise InputError(f"prepare {kind} needs the dataset ROOT: semanticmim data prepare {kind} ROOT --out M.json")
    if shards:
        from semanticmim.data.layouts import read_split
        from semanticmim.data.shards import write_shards

        if kind not in ("imagenet", "imagefolder"):
            raise InputError(f"--shards is for classification folders (imagenet, imagefolder), not {kind!r}")
        samples = [(Path(path), label) for path, label in read_split(kind, root, (split or ["train"])[0]).samples]
        index = write_shards(samples, out, max_side=max_side, workers=workers or 1)
        typer.echo(f"wrote {out}: {len(index['shards'])} shards, longer side <= {max_side} px")
        return
    manifest = write_manifest(root, kind, out, split or None, workers or 8)
    typer.echo(f"wrote {out}: {manifest['files']} files, splits {manifest['splits']}, {manifest['fingerprint'][:19]}")


# --------------------------------------------------------------------------------------------- targets


@targets_app.command("import-dalle")
@friendly_errors
def targets_import_dalle_command(
    encoder_pkl: Annotated[Path, typer.Argument(help="OpenAI's DALL-E encoder.pkl (a pickled Encoder module).")],
    out: Annotated[Path, typer.Argument(help="The DalleTokenizer safetensors file to write.")],
) -> None:
    """Convert OpenAI's DALL-E encoder.pkl into a DalleTokenizer safetensors file (unpickles the input)."""
    from semanticmim.targets.dalle import import_openai_pickle

    typer.echo(
        f"note: {encoder_pkl} is a Python pickle and will be unpickled; use only a file you trust "
        "(OpenAI's encoder.pkl). Globals outside torch's module classes are refused.",
        err=True,
    )
    tokenizer = import_openai_pickle(encoder_pkl, out)
    config = tokenizer.config
    typer.echo(
        f"wrote {out}: DalleTokenizer vocab_size={config.vocab_size} n_hid={config.n_hid} "
        f"group_count={config.group_count} n_blk_per_group={config.n_blk_per_group} "
        f"({config.downsample}x downsampling)"
    )


@targets_app.command("train-dvae")
@friendly_errors
def targets_train_dvae_command(
    params: Annotated[Path, typer.Option(help="params.yaml-shaped file; its `dvae` section is read.")] = Path(
        "params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/dvae"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bar; one line per epoch.")] = False,
    discard_stale_checkpoints: Annotated[bool, typer.Option(
        help="Delete checkpoints written with other settings instead of refusing them.")] = False,
) -> None:
    """Train our own dVAE tokenizer (OpenAI's weights cannot be downloaded here); writes tokenizer.safetensors."""
    from stages import dvae

    metrics = run_training(lambda: dvae.run(params, out, quiet, device, discard_stale_checkpoints))
    typer.echo(f"dvae: final loss {metrics['final_loss']:.4f}, held-out perplexity {metrics['val_perplexity']:.1f}, "
               f"wrote {out / 'tokenizer.safetensors'}")


# ------------------------------------------------------------------------------------------------ eval


@app.command("eval")
@friendly_errors
def eval_command(
    protocol: Annotated[str, typer.Argument(help="linear-cls | finetune-cls | linear-seg | finetune-seg (or with _)")],
    encoder: Annotated[Path, typer.Option(help="timm-format export: model.safetensors + config.json.")],
    data: Annotated[Path | None, typer.Option(help="Dataset root (default: the params' eval.<protocol>.data).")] = None,
    layout: Annotated[str | None, typer.Option("--format", help="imagefolder | imagenet | voc | ade20k | pairs "
                                               "(default: the params' eval.<protocol>.data)")] = None,
    params: Annotated[Path, typer.Option(help="params.yaml-shaped file; `eval.<protocol>` is read.")] = Path(
        "params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder (metrics.json, dvclive/, checkpoints/).")] = Path(
        "runs/eval"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    discard_stale_checkpoints: Annotated[bool, typer.Option(
        help="Delete checkpoints written with other settings instead of refusing them (dvc.yaml uses it).")] = False,
) -> None:
    """Evaluate an encoder (ours or any timm ViT exported the same way) with one Table 1 protocol."""
    from stages import evaluate

    results = run_training(lambda: evaluate.run(protocol, encoder, data, layout, params, out, quiet, device,
                                                discard_stale_checkpoints))
    headline = results["run"].get("headline", {})
    typer.echo(f"{protocol}: " + ", ".join(f"{k} {v:.2f}" for k, v in headline.items()))


@app.command("probe-curve")
@friendly_errors
def probe_curve_command(
    snapshots: Annotated[Path, typer.Option(help="A pretraining's snapshots/ folder (epoch_NNNN/ timm exports).")],
    params: Annotated[Path, typer.Option(help="params.yaml-shaped file; `eval.linear_cls` is the probe.")] = Path(
        "params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder (curve.tsv, metrics.json, epoch_NNNN/).")] = Path(
        "runs/probe_curve"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    discard_stale_checkpoints: Annotated[bool, typer.Option(
        help="Delete checkpoints written with other settings instead of refusing them (dvc.yaml uses it).")] = False,
) -> None:
    """The linear probe of every encoder snapshot of one pretraining: top-1 against pretraining epoch."""
    from stages import probe_curve

    curve = run_training(lambda: probe_curve.run(snapshots, params, out, quiet, device, discard_stale_checkpoints))
    typer.echo("probe-curve: " + ", ".join(f"epoch {e} cls {v.get('top1_cls', float('nan')):.1f}"
                                           for e, v in curve.items()))


# -------------------------------------------------------------------------------------------- report


@app.command("attention")
@friendly_errors
def attention_command(
    encoder: Annotated[Path, typer.Option(help="timm-format export: model.safetensors + config.json.")],
    params: Annotated[Path, typer.Option(help="params.yaml-shaped file; `report.attention` is read.")] = Path(
        "params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder (maps.safetensors, metrics.json, run.json).")] = Path(
        "runs/attention"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Attention analysis of one encoder: the maps of Figs. 7-10 and 14, consistency and completeness."""
    from stages import attention

    numbers = attention.run(encoder, params, out, device)
    typer.echo("attention: " + ", ".join(f"{k} {v:.3f}" for k, v in numbers.items()))


@floor_app.command("random-init")
@friendly_errors
def floor_random_init_command(
    params: Annotated[Path, typer.Option(help="params.yaml-shaped file (`pretrain`, `report.floors`).")] = Path(
        "params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder (model.safetensors, encoder/).")] = Path(
        "runs/pretrain/random-init"),
) -> None:
    """A seeded, untrained encoder of the profile's shape, exported like a pretrained one."""
    from stages import floors

    config = floors.random_init(params, out)
    typer.echo(f"wrote {out}/encoder ({config['architecture']}, untrained)")


@floor_app.command("raw-pixels")
@friendly_errors
def floor_raw_pixels_command(
    params: Annotated[Path, typer.Option(help="params.yaml-shaped file (`eval.linear_cls`, `report.floors`).")] = Path(
        "params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder (metrics.json, run.json).")] = Path("runs/floors/raw-pixels"),
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """The linear probe's recipe on raw pixels: the floor of Table 1's classification columns."""
    from stages import floors

    results = run_training(lambda: floors.raw_pixels(params, out, quiet))
    typer.echo(f"raw pixels: top1 {results['top1']:.2f}")


@app.command("report")
@friendly_errors
def report_command(
    params: Annotated[Path, typer.Option(help="params.yaml-shaped file (`report`, `eval`).")] = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("reports"),
) -> None:
    """Table 1, the attention figures, the scores, the curves and the page, from the runs on disk."""
    from stages import report

    written = report.run(params, out)
    typer.echo(f"wrote {out}: {', '.join(written)}")


@app.command("doctor")
@friendly_errors
def doctor_command(
    params: Annotated[Path, typer.Option(help="The params file of the run to check.")] = Path("params.yaml"),
    lock: Annotated[Path, typer.Option(help="The lock file the environment should match.")] = Path(
        "requirements.lock"),
) -> None:
    """Check an environment before a long run: packages vs the lock, CUDA/cuDNN/NCCL, an all-reduce across
    the ranks, shared memory, disk, DVC cache and dataset roots. Exit code 1 when something would fail."""
    from stages import doctor

    checks = doctor.run_checks(params, lock)
    typer.echo(doctor.format_report(checks))
    raise typer.Exit(code=doctor.exit_code(checks))
