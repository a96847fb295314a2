"""Reading params.yaml: one section at a time, validated against its schema (pydantic), with one-line
errors naming the file and key; paths in params are relative to the project root.

Each section's schema sits with the stage that reads it (`stages.prepare.DataPrepareParams`,
`stages.dvae.DVAEParams`, `stages.pretrain.PretrainParams`, and each evaluation protocol's `Settings`),
so a stage imports only what it runs; the library owns the types a schema is made of (recipes, run
options, the method registry's paper values). A profile states only what it changes."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from semanticmim.errors import InputError
from semanticmim.settings import Strict, describe

# section -> "module:Schema", imported on demand
SECTIONS = {"data": "stages.prepare:DataPrepareParams", "dvae": "stages.dvae:DVAEParams",
            "pretrain": "stages.pretrain:PretrainParams", "ablation": "stages.ablation:AblationParams",
            "seeds": "stages.report:SeedsParams"}


class DataParams(Strict):
    """Where a stage reads images: an ImageFolder-style root (the embedded dataset is one), or a folder of
    WebDataset shards written by `semanticmim data prepare imagenet ROOT --shards --out DIR`."""

    format: Literal["imagefolder", "shards"] = "imagefolder"
    root: Path = Path("data/embedded/classification")
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = Field(2, ge=0)



def repo_root_of(path: Path) -> Path:
    """Paths in params are relative to the project root: the first ancestor holding dvc.yaml or .git."""
    for folder in [path.resolve().parent, *path.resolve().parents]:
        if (folder / "dvc.yaml").exists() or (folder / ".git").exists():
            return folder
    return path.resolve().parent


def read_section(params_file: str | Path, section: str) -> dict:
    """The raw `section` mapping of a params.yaml-shaped file (one-line InputErrors)."""
    params_file = Path(params_file)
    if not params_file.is_file():
        raise InputError(f"{params_file}: params file not found")
    try:
        document = yaml.safe_load(params_file.read_text()) or {}
    except yaml.YAMLError as error:
        raise InputError(f"{params_file}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict) or section not in document:
        raise InputError(f"{params_file}: has no '{section}' section")
    return document[section] or {}


def validate(schema: type[BaseModel], values: dict, params_file: str | Path, location: str) -> BaseModel:
    try:
        section = schema.model_validate(values)
        if hasattr(section, "check"):
            section.check()
    except ValidationError as error:
        raise InputError(f"{params_file}: {describe(error, location)}") from None
    except InputError as error:
        raise InputError(f"{params_file}: {error}") from None
    return section


def resolve_path(path: Path, params_file: str | Path) -> Path:
    return path if path.is_absolute() else repo_root_of(Path(params_file)) / path


def has_section(params_file: str | Path, section: str) -> bool:
    """Whether a readable params file has `section` (an unreadable one answers True: reading it then says why)."""
    try:
        document = yaml.safe_load(Path(params_file).read_text())
    except (OSError, yaml.YAMLError):
        return True
    return not isinstance(document, dict) or section in document


def load_section(params_file: str | Path, section: str, optional: bool = False) -> BaseModel:
    """Read `section` of a params.yaml-shaped file and validate it. Raises one-line InputErrors.
    optional: a file without the section gets the schema's defaults (e.g. no ablation points)."""
    module, _, name = SECTIONS[section].partition(":")
    schema = getattr(importlib.import_module(module), name)
    if optional and not has_section(params_file, section):
        return schema()
    return validate(schema, read_section(params_file, section), params_file, section)
