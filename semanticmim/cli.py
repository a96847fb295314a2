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
