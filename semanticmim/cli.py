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
app.add_typer(targets_app, name="targets")
app.add_typer(data_app, name="data")

err_console = Console(stderr=True)


def friendly_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bad-input exceptions into a one-line `error: ...` on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


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
) -> None:
    """Training-step speed of every variant and of timm's ViT, measured in one run, with ratios."""
    from semanticmim.bench import run_benchmark

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
