"""params.yaml validation: every profile parses; bad values are one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from semanticmim.config import load_section, repo_root_of, resolve_path
from semanticmim.errors import InputError
from semanticmim.models import VARIANTS

REPO = Path(__file__).resolve().parents[1]
PROFILES = [REPO / "params.yaml", REPO / "params" / "smoke.yaml", REPO / "params" / "paper.yaml"]


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.exists()], ids=lambda p: p.name)
def test_every_profile_validates_for_every_variant(profile):
    pretrain = load_section(profile, "pretrain")
    for variant in VARIANTS:
        recipe = pretrain.recipe(variant)
        assert recipe.num_proxy >= 1 and (recipe.mask_ratio is None) == (variant == "mocov3")
    load_section(profile, "dvae")
    load_section(profile, "data")


def test_paper_profile_is_table_2():
    pretrain = load_section(REPO / "params" / "paper.yaml", "pretrain")
    beit, maskfeat = pretrain.recipe("beit"), pretrain.recipe("maskfeat-semanticmim")
    assert (beit.lr, beit.min_lr, beit.warmup_epochs, beit.clip_grad, beit.crop_scale, beit.color_jitter) == (
        1.5e-3, 1e-5, 10, 3.0, (0.08, 1.0), 0.4)
    assert (maskfeat.lr, maskfeat.min_lr, maskfeat.warmup_epochs, maskfeat.clip_grad, maskfeat.crop_scale) == (
        1.6e-3, 1e-6, 30, 0.02, (0.5, 1.0))
    assert (maskfeat.mask_ratio, maskfeat.num_proxy, beit.mask_ratio, beit.num_proxy) == (0.6, 8, 0.4, 1)
    assert pretrain.effective_batch == 2048 and beit.scaled_lr(1024) == pytest.approx(0.75e-3)


def write(tmp_path: Path, document) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"pretrain": {"epochs": 0}}, "pretrain.epochs: Input should be greater than 0 (got 0)"),
        ({"pretrain": {"lr": "fast"}}, "pretrain.lr: Input should be a valid number"),
        ({"pretrain": {"learning_rate": 1}}, "pretrain.learning_rate: Extra inputs are not permitted"),
        ({"pretrain": {"model": {"depth": -1}}}, "pretrain.model.depth: Input should be greater than 0"),
        ({"pretrain": {"variants": {"mae": {}}}}, "pretrain.variants.mae: Input should be 'beit'"),
        ({"pretrain": {"mask_ratio": 1.0}}, "pretrain.mask_ratio: Input should be less than 1"),
        ({"pretrain": {"crop_scale": [0.9, 0.2]}}, "crop_scale must satisfy 0 < low <= high <= 1"),
        ({"data": {"kind": "imagenet"}}, "kind 'imagenet' needs `root`"),
        ({"other": {}}, "has no 'pretrain' section"),
        ("pretrain: [unclosed", "not valid YAML"),
    ],
)
def test_bad_params_are_one_line_errors(tmp_path, document, message):
    section = next(iter(document)) if isinstance(document, dict) and "data" in document else "pretrain"
    with pytest.raises(InputError) as error:
        load_section(write(tmp_path, document), section)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(tmp_path / "params.yaml") in str(error.value)


def test_bad_variant_override_names_the_variant(tmp_path):
    pretrain = load_section(write(tmp_path, {"pretrain": {"variants": {"beit": {"clip_grad": -1}}}}), "pretrain")
    with pytest.raises(InputError, match=r"pretrain\.variants\.beit\.clip_grad: Input should be greater than 0"):
        pretrain.recipe("beit")
    with pytest.raises(InputError, match="unknown variant 'mae'"):
        pretrain.recipe("mae")


def test_missing_params_file(tmp_path):
    with pytest.raises(InputError, match="params file not found"):
        load_section(tmp_path / "nope.yaml", "pretrain")


def test_paths_are_relative_to_the_project_root(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params").mkdir()
    params = tmp_path / "params" / "smoke.yaml"
    assert repo_root_of(params) == tmp_path
    assert resolve_path(Path("data/x"), params) == tmp_path / "data" / "x"
    assert resolve_path(Path("/abs/x"), params) == Path("/abs/x")
