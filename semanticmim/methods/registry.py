"""The method registry: each pretraining variant described once (solo-learn's `METHODS`, lightly's
model + transform pairs). An entry holds the block style, the target, the augmentation and the recipe
values in which the method departs from the common recipe, each with its source; the builders below turn
an entry into a model, a transform and a task. Nothing else dispatches on a variant's name: a new
variant is one entry.

Recipe resolution, lowest first: `PretrainRecipe`'s defaults (paper Table 2, common to BEiT and
MaskFeat) <- the method's `recipe` (its Table 2 column, or the official code where the paper is silent)
<- a profile's common values <- the profile's values for this variant. So a profile states only what it
changes from the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, TypeAdapter, ValidationError

from semanticmim.data.transforms import BeitTwoView, CropFlip, MocoTwoView
from semanticmim.engine.recipe import Recipe
from semanticmim.errors import InputError
from semanticmim.methods.tasks import MIMTask, MoCoTask, WithMasks
from semanticmim.models.factory import hog_dim
from semanticmim.models.masking import MaskGenerator
from semanticmim.models.mim import MaskedImageModel, MIMConfig
from semanticmim.models.mocov3 import MoCoConfig, MoCoV3
from semanticmim.models.vit import EncoderConfig, EncoderShape
from semanticmim.settings import describe
from semanticmim.targets import DalleTokenizer, HOGTarget

Ratio = Annotated[float, Field(gt=0.0, lt=1.0)]


@dataclass(frozen=True)
class PretrainRecipe(Recipe):
    """A pretraining recipe: the common `Recipe` plus what the methods add. Every field can be set per
    variant (`pretrain.variants.<name>.<field>`)."""

    drop_path: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1  # stochastic depth 0.1 (Table 2)
    mask_ratio: Ratio | None = None  # share of patches masked; None: no masking (MoCo v3)
    img_mask_ratio: Ratio | None = None  # a separate IMG mask (paper §6); None: IMG = the complement of MASK
    num_proxy: PositiveInt = 1  # K, the [PROXY] tokens
    color_jitter: NonNegativeFloat = 0.4
    hflip: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    decay_all: bool = False  # weight decay on every parameter (official MoCo v3); False: not on norms, biases, tokens
    base_momentum: Annotated[float, Field(gt=0.0, le=1.0)] = 0.99  # MoCo v3 momentum encoder, cosine to 1
    temperature: PositiveFloat = 0.2  # MoCo v3 InfoNCE
    mlp_dim: PositiveInt = 4096  # MoCo v3 projector/predictor hidden width
    out_dim: PositiveInt = 256  # MoCo v3 embedding


@dataclass(frozen=True)
class Method:
    """One pretraining variant."""

    name: str
    block: Literal["beit", "vit"]  # BEiT blocks (layer-scale, q/v bias) or plain ViT blocks (MaskFeat, MoCo v3)
    semantic: bool  # SemanticMIM's proxy bottleneck (compression + reconstruction blocks)
    target: Literal["dvae", "hog"] | None  # what the masked patches predict; None: contrastive
    augmentation: Literal["beit-two-view", "crop-flip", "moco-two-view"]
    recipe: dict[str, Any] = field(default_factory=dict)  # departures from PretrainRecipe's defaults
    sources: dict[str, str] = field(default_factory=dict)  # where each value of `recipe` comes from

    @property
    def masks(self) -> bool:
        return self.target is not None


_BEIT = {"lr": 1.5e-3, "min_lr": 1e-5, "warmup_epochs": 10.0, "clip_grad": 3.0, "crop_scale": (0.08, 1.0),
         "color_jitter": 0.4}
_MASKFEAT = {"lr": 1.6e-3, "min_lr": 1e-6, "warmup_epochs": 30.0, "clip_grad": 0.02, "crop_scale": (0.5, 1.0),
             "color_jitter": 0.0}
_TABLE2 = "paper Table 2"
_SEMANTIC = {"mask_ratio": 0.6, "num_proxy": 8}  # paper §4.1 (official configs: BEiT K=1, MaskFeat r=0.8)
_BASELINE = {"mask_ratio": 0.4, "num_proxy": 1}  # paper §4.1: the baselines as reproduced, one [CLS]

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("beit", "beit", False, "dvae", "beit-two-view", {**_BEIT, **_BASELINE},
           dict.fromkeys(_BEIT, _TABLE2) | dict.fromkeys(_BASELINE, "paper §4.1")),
    Method("beit-semanticmim", "beit", True, "dvae", "beit-two-view", {**_BEIT, **_SEMANTIC},
           dict.fromkeys(_BEIT, _TABLE2) | dict.fromkeys(_SEMANTIC, "paper §4.1")),
    Method("maskfeat", "vit", False, "hog", "crop-flip", {**_MASKFEAT, **_BASELINE},
           dict.fromkeys(_MASKFEAT, _TABLE2) | dict.fromkeys(_BASELINE, "paper §4.1")),
    Method("maskfeat-semanticmim", "vit", True, "hog", "crop-flip", {**_MASKFEAT, **_SEMANTIC},
           dict.fromkeys(_MASKFEAT, _TABLE2) | dict.fromkeys(_SEMANTIC, "paper §4.1")),
    # MoCo v3 ViT-B (Chen et al. 2021 and facebookresearch/moco-v3): blr 1.5e-4 per 256 images, wd 0.1 on
    # every parameter, 40 warmup epochs, no clipping, no stochastic depth.
    Method("mocov3", "vit", False, None, "moco-two-view",
           {"lr": 1.5e-4, "lr_batch": 256, "min_lr": 0.0, "warmup_epochs": 40.0, "weight_decay": 0.1,
            "decay_all": True, "clip_grad": None, "crop_scale": (0.08, 1.0), "drop_path": 0.0},
           {"lr": "MoCo v3 paper", "lr_batch": "MoCo v3 paper", "min_lr": "moco-v3 code", "warmup_epochs":
            "MoCo v3 paper", "weight_decay": "MoCo v3 paper", "decay_all": "moco-v3 code",
            "clip_grad": "moco-v3 code", "crop_scale": "moco-v3 code", "drop_path": "moco-v3 code"}),
)}

_RECIPE = TypeAdapter(PretrainRecipe)
VariantName = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # a params field naming a variant


def method(name: str) -> Method:
    """The registry entry, or a one-line InputError listing the variants."""
    if name not in METHODS:
        raise InputError(f"unknown variant {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]


def resolve_recipe(name: str, common: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                   location: str = "pretrain") -> PretrainRecipe:
    """The variant's recipe: defaults <- its registry values <- `common` <- `overrides` (validated)."""
    values = {**method(name).recipe, **(common or {}), **(overrides or {})}
    try:
        return _RECIPE.validate_python(values)
    except ValidationError as error:
        raise InputError(describe(error, location)) from None


def recipe_sources(name: str, common: dict[str, Any], overrides: dict[str, Any]) -> dict[str, str]:
    """Where each resolved recipe value comes from: the variant's profile entry, the profile, the method's
    registry entry (its stated source), or the common defaults (paper Table 2)."""
    entry = method(name)
    sources = {}
    for key in asdict(PretrainRecipe()):
        if key in overrides:
            sources[key] = "profile (this variant)"
        elif key in common:
            sources[key] = "profile"
        else:
            sources[key] = entry.sources.get(key, _TABLE2 + " (common)")
    return sources


def encoder_config(entry: Method, shape: EncoderShape, recipe: PretrainRecipe) -> EncoderConfig:
    """The encoder of a variant: the profile's shape, the method's block style, the recipe's K and drop path."""
    return EncoderConfig(**{**asdict(shape), "block": entry.block, "num_proxy": recipe.num_proxy,
                            "drop_path": recipe.drop_path})


def build_variant(name: str, encoder: EncoderConfig, num_proxy: int | None = None, target_dim: int | None = None,
                  recipe: PretrainRecipe | None = None):
    """The variant's pretraining model on `encoder`'s shape (block style the method's; K `num_proxy`, else
    the method's paper default). `target_dim`: tokenizer vocabulary or HOG values per patch."""
    entry = method(name)
    recipe = recipe or resolve_recipe(name)
    num_proxy = recipe.num_proxy if num_proxy is None else num_proxy
    encoder = EncoderConfig(**{**encoder.to_dict(), "block": entry.block, "num_proxy": num_proxy})
    if entry.target is None:
        return MoCoV3(MoCoConfig(encoder, recipe.mlp_dim, recipe.out_dim, recipe.temperature))
    if target_dim is None:
        target_dim = 8192 if entry.target == "dvae" else hog_dim(encoder.patch_size)
    return MaskedImageModel(MIMConfig(encoder, entry.semantic, entry.target, target_dim))


def build_transform(name: str, recipe: PretrainRecipe, img_size: int, num_patches: int):
    """The variant's augmentation (docs/recipes.md), with masks drawn per sample for the MIM methods."""
    entry = method(name)
    if entry.augmentation == "beit-two-view":
        transform = BeitTwoView(img_size, recipe.crop_scale, recipe.color_jitter, recipe.hflip)
    elif entry.augmentation == "crop-flip":
        transform = CropFlip(img_size, recipe.crop_scale, recipe.hflip)
    else:
        transform = MocoTwoView(img_size, recipe.crop_scale)
    if not entry.masks:
        return transform
    if recipe.mask_ratio is None:
        raise InputError(f"pretrain.variants.{name}.mask_ratio: {name} masks patches and needs a mask ratio")
    return WithMasks(transform, MaskGenerator(num_patches, recipe.mask_ratio, recipe.img_mask_ratio))


def build_task(name: str, encoder: EncoderConfig, recipe: PretrainRecipe, total_steps: int,
               hog: HOGTarget | None = None, tokenizer: DalleTokenizer | None = None, decoder=None):
    """The variant's task (model + target) for the engine's loop. `hog` for HOG targets, `tokenizer` (and
    optionally our dVAE's `decoder`, for drawing reconstructions) for dVAE targets."""
    entry = method(name)
    if entry.target is None:
        model = build_variant(name, encoder, recipe=recipe)
        return MoCoTask(name, model, total_steps, recipe.base_momentum)
    if entry.target == "hog":
        if hog is None:
            raise InputError(f"{name} predicts HOG but no HOG target was given")
        return MIMTask(name, build_variant(name, encoder, target_dim=hog.out_dim, recipe=recipe), hog=hog)
    if tokenizer is None:
        raise InputError(f"{name} predicts dVAE tokens but no tokenizer was given")
    check_tokenizer_grid(tokenizer.downsample, encoder.patch_size)
    model = build_variant(name, encoder, target_dim=tokenizer.vocab_size, recipe=recipe)
    return MIMTask(name, model, tokenizer=tokenizer, decoder=decoder)


def check_tokenizer_grid(downsample: int, patch_size: int) -> None:
    """BEiT's tokenizer sees the half-size view (BeitTwoView), so one token covers 2 * downsample pixels of
    the model's image: that must be one patch, or the target grid is not the patch grid."""
    if 2 * downsample != patch_size:
        raise InputError(f"the tokenizer downsamples its half-size view by {downsample}, so a token covers "
                         f"{2 * downsample} px, but the patch size is {patch_size}: tokenizer grid and patch grid "
                         f"must match (group_count = log2(patch size))")
