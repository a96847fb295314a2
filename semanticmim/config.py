"""The one schema of params.yaml: typed, validated sections that stages hand to the library.

Every recipe value has one home here (its default) or in params.yaml (the profile's choice). Unknown
keys, wrong types and out-of-range values are one-line `InputError`s naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

from semanticmim.errors import InputError
from semanticmim.models.factory import VARIANTS
from semanticmim.schema import Strict, describe

VariantName = Literal["beit", "beit-semanticmim", "maskfeat", "maskfeat-semanticmim", "mocov3"]


class ModelParams(Strict):
    """Encoder shape (ViT-B/16 at paper scale)."""

    img_size: PositiveInt = 224
    patch_size: PositiveInt = 16
    embed_dim: PositiveInt = 768
    depth: PositiveInt = 12
    num_heads: PositiveInt = 12
    mlp_ratio: PositiveFloat = 4.0
    drop_path: float = Field(0.1, ge=0.0, lt=1.0)  # stochastic depth 0.1 (Table 2)


class DataParams(Strict):
    """Where a stage reads images: an ImageFolder-style root (the embedded dataset is one), or a folder of
    WebDataset shards written by `semanticmim data prepare imagenet ROOT --shards --out DIR`."""

    format: Literal["imagefolder", "shards"] = "imagefolder"
    root: Path = Path("data/embedded/classification")
    train_split: str = "train"
    val_split: str = "val"
    num_workers: int = Field(2, ge=0)


class Recipe(Strict):
    """One pretraining recipe (paper Table 2; DESIGN §3). Every field can be overridden per variant."""

    epochs: PositiveInt = 300
    effective_batch: PositiveInt = 2048  # the recipe's global batch; accumulation makes it up
    batch_size: PositiveInt = 64  # per device, what fits
    lr: PositiveFloat = 1.5e-3
    lr_batch: PositiveInt = 2048  # `lr` is stated for this global batch and scaled linearly from it
    min_lr: float = Field(1e-5, ge=0.0)
    warmup_epochs: float = Field(10.0, ge=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    clip_grad: PositiveFloat | None = 3.0
    mask_ratio: float | None = Field(None, gt=0.0, lt=1.0)  # None: the variant's paper default
    img_mask_ratio: float | None = Field(None, gt=0.0, lt=1.0)  # separate IMG mask (paper §6); None: shared
    num_proxy: PositiveInt | None = None  # None: the variant's paper default
    crop_scale: tuple[float, float] = (0.08, 1.0)
    color_jitter: float = Field(0.4, ge=0.0)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    base_momentum: float = Field(0.99, gt=0.0, le=1.0)  # MoCo v3
    temperature: PositiveFloat = 0.2  # MoCo v3
    mlp_dim: PositiveInt = 4096  # MoCo v3 projector/predictor hidden width
    out_dim: PositiveInt = 256  # MoCo v3 embedding

    @model_validator(mode="after")
    def _check_crop(self) -> Recipe:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        return self

    def scaled_lr(self, global_batch: int) -> float:
        """The recipe's lr rule: linear in the global batch, from `lr` at `lr_batch`."""
        return self.lr * global_batch / self.lr_batch


class RunParams(Strict):
    """How a training run executes (not what it computes)."""

    seed: int = 0
    checkpoint_every: PositiveInt = 500  # optimizer steps
    keep_checkpoints: PositiveInt = 3
    log_every: PositiveInt = 10
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    profile: bool = False  # on CUDA, synchronise around step phases to measure where time goes
    discard_stale: bool = False  # delete checkpoints of other settings instead of refusing them (dvc.yaml)


class HOGParams(Strict):
    nbins: PositiveInt = 9
    cell_size: PositiveInt | None = None  # None: patch_size / 2 (8 px at 16-px patches)


class PretrainParams(Recipe):
    """The `pretrain` section: common recipe fields, run settings and per-variant overrides."""

    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    run: RunParams = RunParams()
    hog: HOGParams = HOGParams()
    tokenizer: Path = Path("runs/dvae/tokenizer.safetensors")  # BEiT's dVAE (own or imported OpenAI)
    variants: dict[VariantName, dict[str, Any]] = Field(default_factory=dict)

    def recipe(self, variant: str) -> Recipe:
        """The common recipe with `variants[variant]` merged over it, validated."""
        if variant not in VARIANTS:
            raise InputError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
        common = {name: getattr(self, name) for name in Recipe.model_fields}
        overrides = self.variants.get(variant, {})
        try:
            recipe = Recipe(**{**common, **overrides})
        except ValidationError as error:
            raise InputError(describe(error, f"pretrain.variants.{variant}")) from None
        spec = VARIANTS[variant]
        return recipe.model_copy(update={
            "mask_ratio": recipe.mask_ratio or spec.mask_ratio,
            "num_proxy": recipe.num_proxy or spec.num_proxy,
        })


class DVAEParams(Strict):
    """The `dvae` section: our own discrete VAE tokenizer (OpenAI's weights cannot be downloaded here)."""

    vocab_size: PositiveInt = 8192
    n_hid: PositiveInt = 256
    group_count: PositiveInt = 4  # downsampling 2^(group_count-1): 112 px -> 14x14 tokens at 4 groups
    n_blk_per_group: PositiveInt = 2
    image_size: PositiveInt = 112  # the tokenizer view; half the model's image size
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    min_lr: float = Field(1e-5, ge=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    temperature_start: PositiveFloat = 1.0
    temperature_end: PositiveFloat = 1.0 / 16
    # 0.01 at tiny scale: 0 used ~6 of 64 codes, 0.05 pulled q(z|x) to uniform (tokens carried nothing)
    kl_weight: float = Field(0.01, ge=0.0)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    data: DataParams = DataParams()
    run: RunParams = RunParams()


class DataPrepareParams(Strict):
    """The `data` section: write the embedded dataset, or a manifest of an external one."""

    kind: Literal["embedded", "imagefolder", "imagenet", "voc", "ade20k", "pairs"] = "embedded"
    out: Path = Path("data/embedded")  # embedded: the dataset folder; external: the manifest JSON
    root: Path | None = None  # external datasets only
    image_size: int = Field(64, ge=16, le=512)
    train: PositiveInt = 5000
    val: PositiveInt = 1000
    seed: int = 0

    @model_validator(mode="after")
    def _check_root(self) -> DataPrepareParams:
        if self.kind != "embedded" and self.root is None:
            raise ValueError(f"kind {self.kind!r} needs `root`, the dataset folder")
        return self


SECTIONS: dict[str, type[BaseModel]] = {"data": DataPrepareParams, "pretrain": PretrainParams, "dvae": DVAEParams}


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
        return schema.model_validate(values)
    except ValidationError as error:
        raise InputError(f"{params_file}: {describe(error, location)}") from None


def load_section(params_file: str | Path, section: str) -> BaseModel:
    """Read `section` of a params.yaml-shaped file and validate it. Raises one-line InputErrors."""
    return validate(SECTIONS[section], read_section(params_file, section), params_file, section)


def resolve_path(path: Path, params_file: str | Path) -> Path:
    return path if path.is_absolute() else repo_root_of(Path(params_file)) / path
