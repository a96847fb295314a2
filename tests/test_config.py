"""params.yaml validation: every profile parses; bad values are one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support import PROFILES

from semanticmim.errors import InputError
from semanticmim.methods import METHODS, resolve_recipe
from stages.params import load_section, repo_root_of, resolve_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.exists()], ids=lambda p: p.name)
def test_every_profile_validates_for_every_variant(profile):
    pretrain = load_section(profile, "pretrain")
    for variant in METHODS:
        recipe = pretrain.resolve(variant)
        assert recipe.num_proxy >= 1 and (recipe.mask_ratio is None) == (variant == "mocov3")
    load_section(profile, "dvae")
    load_section(profile, "data")


def test_paper_profile_is_table_2():
    pretrain = load_section(REPO / "params" / "paper.yaml", "pretrain")
    beit, maskfeat = pretrain.resolve("beit"), pretrain.resolve("maskfeat-semanticmim")
    assert (beit.lr, beit.min_lr, beit.warmup_epochs, beit.clip_grad, beit.crop_scale, beit.color_jitter) == (
        1.5e-3, 1e-5, 10, 3.0, (0.08, 1.0), 0.4)
    assert (maskfeat.lr, maskfeat.min_lr, maskfeat.warmup_epochs, maskfeat.clip_grad, maskfeat.crop_scale) == (
        1.6e-3, 1e-6, 30, 0.02, (0.5, 1.0))
    assert (maskfeat.mask_ratio, maskfeat.num_proxy, beit.mask_ratio, beit.num_proxy) == (0.6, 8, 0.4, 1)
    assert beit.batch_size == 2048 and beit.scaled_lr(1024) == pytest.approx(0.75e-3)


def write(tmp_path: Path, document) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"pretrain": {"recipe": {"epochs": 0}}}, "pretrain.recipe.epochs: Input should be greater than 0 (got 0)"),
        ({"pretrain": {"recipe": {"lr": "fast"}}}, "pretrain.recipe.lr: Input should be a valid number"),
        ({"pretrain": {"recipe": {"learning_rate": 1}}}, "pretrain.recipe.learning_rate: Unexpected keyword argument"),
        ({"pretrain": {"lr": 1e-3}}, "pretrain.lr: Extra inputs are not permitted"),
        ({"pretrain": {"model": {"depth": -1}}}, "pretrain.model.depth: Input should be greater than 0"),
        ({"pretrain": {"variants": {"mae": {}}}}, "pretrain.variants.mae: Input should be 'beit'"),
        ({"pretrain": {"variants": {"beit": {"drop_path": 1.5}}}}, "pretrain.variants.beit.drop_path: Input should be"),
        ({"pretrain": {"model": {"drop_path": 0.1}}}, "pretrain.model.drop_path: Unexpected keyword argument"),
        ({"pretrain": {"recipe": {"mask_ratio": 1.0}}}, "pretrain.recipe.mask_ratio: Input should be less than 1"),
        ({"pretrain": {"recipe": {"crop_scale": [0.9, 0.2]}}}, "crop_scale must satisfy 0 < low <= high <= 1"),
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


def test_bad_variant_override_names_the_variant_before_any_stage_runs(tmp_path):
    with pytest.raises(InputError, match=r"pretrain\.variants\.beit\.clip_grad: Input should be greater than 0"):
        load_section(write(tmp_path, {"pretrain": {"variants": {"beit": {"clip_grad": -1}}}}), "pretrain")
    with pytest.raises(InputError, match="unknown variant 'mae'"):
        load_section(REPO / "params.yaml", "pretrain").resolve("mae")


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


def test_the_registry_holds_the_papers_recipes_and_profiles_override_only_what_they_state(tmp_path):
    mocov3, maskfeat = resolve_recipe("mocov3"), resolve_recipe("maskfeat")
    assert (mocov3.lr, mocov3.lr_batch, mocov3.weight_decay, mocov3.clip_grad, mocov3.drop_path, mocov3.decay_all) == (
        1.5e-4, 256, 0.1, None, 0.0, True)
    assert (maskfeat.clip_grad, maskfeat.crop_scale, maskfeat.drop_path, maskfeat.mask_ratio) == (
        0.02, (0.5, 1.0), 0.1, 0.4)
    document = {"pretrain": {"recipe": {"clip_grad": 1.0}, "variants": {"mocov3": {"drop_path": 0.2}}}}
    pretrain = load_section(write(tmp_path, document), "pretrain")
    assert pretrain.resolve("maskfeat").clip_grad == 1.0 and pretrain.resolve("maskfeat").min_lr == 1e-6
    assert pretrain.resolve("mocov3").drop_path == 0.2 and pretrain.resolve("beit").drop_path == 0.1


def test_the_default_profile_states_only_departures_from_the_paper():
    """Every value a profile's `variants.<name>` sets either differs from the registry or is K / r (the
    ablation axes, listed so that `dvc exp run -S` has a key to change)."""
    pretrain = load_section(REPO / "params.yaml", "pretrain")
    for name, values in pretrain.variants.items():
        paper = METHODS[name].recipe
        same = {k for k, v in values.items() if k in paper and paper[k] == v} - {"num_proxy", "mask_ratio"}
        assert not same, f"{name} restates paper values {same}"


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_profiles_evaluation_sections_validate(profile):
    """Each protocol in `eval.protocols` has a section its protocol's Settings accept (without running it)."""
    import importlib

    from stages.evaluate import PROTOCOLS, protocol_name
    from stages.params import read_section, validate

    evaluation = read_section(profile, "eval")
    assert evaluation["protocols"] and evaluation["encoders"]
    for protocol in evaluation["protocols"]:
        values = dict(evaluation.get(protocol) or {})
        assert "data" in values, f"{profile.name}: eval.{protocol} has no data"
        values.pop("data")
        module = importlib.import_module(PROTOCOLS[protocol_name(protocol)])
        validate(module.Settings, values, profile, f"eval.{protocol}")
