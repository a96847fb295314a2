"""One run's recipe values and seed on top of the profile: `semanticmim pretrain VARIANT --set KEY=VALUE
--seed N` (`stages.pretrain.parse_overrides`, `PretrainParams.resolve(variant, overrides)`, `run(...,
overrides=, seed=)`). Parsing and resolving are checked directly; one smoke-profile project checks that the
run records what it resolved and that its weights are a function of the seed."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from semanticmim.errors import InputError
from stages.cli import app
from stages.params import load_section
from stages.pretrain import parse_overrides

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"
VARIANT = "maskfeat-semanticmim"  # a K variant with a HOG target: no tokenizer to train first

runner = CliRunner()


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message.strip() and "\n" not in message.strip(), f"not one line: {message!r}"
    return message


# ---------------------------------------------------------------------------------------- parse_overrides


@pytest.mark.parametrize(("item", "expected"), [
    ("num_proxy=4", 4),
    ("epochs=0x10", 16),  # YAML ints
    ("mask_ratio=0.5", 0.5),
    ("lr=1.5e-4", 1.5e-4),
    ("mask_ratio=.25", 0.25),
    ("img_mask_ratio=null", None),
    ("img_mask_ratio=~", None),
    ("decay_all=true", True),
    ("decay_all=False", False),
    ("crop_scale=[0.2, 1.0]", [0.2, 1.0]),
    (" num_proxy = 4 ", 4),  # spaces around the key and the value
])
def test_parse_overrides_reads_values_as_yaml_scalars(item, expected):
    ((key, value),) = parse_overrides([item]).items()
    assert key == item.partition("=")[0].strip()
    assert value == expected and type(value) is type(expected)


def test_parse_overrides_keeps_every_item_and_the_last_of_a_repeated_key():
    assert parse_overrides([]) == {}
    assert parse_overrides(["num_proxy=2", "mask_ratio=0.5", "num_proxy=4"]) == {"num_proxy": 4, "mask_ratio": 0.5}
    assert parse_overrides(["note=a=b"]) == {"note": "a=b"}  # only the first `=` separates


@pytest.mark.parametrize("item", ["num_proxy", "=4", " =4", "num_proxy=", "num_proxy=  ", "num_proxy=[1,"])
def test_malformed_items_are_one_line_input_errors_naming_the_item(item):
    with pytest.raises(InputError) as error:
        parse_overrides([item])
    message = one_line(error)
    assert "--set" in message and repr(item) in message


# ------------------------------------------------------------------------------------------------- resolve


@pytest.fixture(scope="module")
def smoke():
    return load_section(SMOKE, "pretrain")


def test_overrides_apply_over_the_profiles_variant_values_and_change_nothing_else(smoke):
    profile = smoke.resolve("beit-semanticmim")
    assert profile.num_proxy == 8  # the smoke profile's own value for this variant
    own_before = dict(smoke.variants["beit-semanticmim"])
    overridden = smoke.resolve("beit-semanticmim", {"num_proxy": 2})
    assert overridden.num_proxy == 2
    assert {**asdict(overridden), "num_proxy": profile.num_proxy} == asdict(profile)
    assert smoke.variants["beit-semanticmim"] == own_before  # the profile is not modified
    assert smoke.resolve("beit-semanticmim") == profile
    assert smoke.resolve("beit-semanticmim", {}) == profile


def test_overrides_apply_over_the_profiles_common_values(smoke):
    assert smoke.resolve("maskfeat").epochs == 2  # pretrain.recipe.epochs of the smoke profile
    recipe = smoke.resolve("maskfeat", {"epochs": 1, "clip_grad": None})
    assert (recipe.epochs, recipe.clip_grad) == (1, None)
    assert recipe.lr == smoke.resolve("maskfeat").lr


def test_set_values_are_validated_as_the_recipe_types(smoke):
    """What `--set` reads as YAML is converted as the recipe's fields are (an exponent without a dot is a
    string to YAML 1.1, still a float to the recipe; a list is the crop tuple)."""
    recipe = smoke.resolve("maskfeat", parse_overrides(["lr=1e-3", "crop_scale=[0.2, 1.0]", "num_proxy=2.0"]))
    assert (recipe.lr, recipe.crop_scale, recipe.num_proxy) == (1e-3, (0.2, 1.0), 2)


def test_the_python_spelling_of_none_is_never_silently_a_value(smoke):
    """YAML's null is `null` or `~`; `None` must give None or a one-line error naming the key."""
    try:
        recipe = smoke.resolve("maskfeat", parse_overrides(["clip_grad=None"]))
    except InputError as error:
        assert "clip_grad" in str(error) and "\n" not in str(error).strip()
    else:
        assert recipe.clip_grad is None


@pytest.mark.parametrize(("overrides", "key"), [
    ({"num_prox": 2}, "num_prox"),
    ({"learning_rate": 1e-3}, "learning_rate"),
    ({"num_proxy": 0}, "num_proxy"),
    ({"num_proxy": "many"}, "num_proxy"),
    ({"num_proxy": 2.5}, "num_proxy"),
    ({"num_proxy": None}, "num_proxy"),
    ({"mask_ratio": 1.5}, "mask_ratio"),
    ({"drop_path": -0.1}, "drop_path"),
])
def test_an_unknown_key_or_a_bad_value_is_a_one_line_input_error_naming_it(smoke, overrides, key):
    with pytest.raises(InputError) as error:
        smoke.resolve("beit-semanticmim", overrides)
    message = one_line(error)
    assert key in message and "--set" in message


def test_a_bad_set_fails_on_the_command_line_before_anything_is_written(tmp_path):
    for item, needle in (("num_proxy", "'num_proxy'"), ("num_prox=2", "num_prox"), ("num_proxy=0", "num_proxy")):
        out = tmp_path / "run"
        result = runner.invoke(app, ["pretrain", VARIANT, "--params", str(SMOKE), "--out", str(out), "--device",
                                     "cpu", "--quiet", "--set", item])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2, result.output
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
        assert "Traceback" not in result.output
        assert not out.exists()


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project's smoke profile as params.yaml (dvc.yaml marks the root), its data prepared."""
    root = tmp_path_factory.mktemp("overrides")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(SMOKE, root / "params.yaml")
    result = runner.invoke(app, ["data", "prepare", "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert (root / "data" / "smoke" / "classification" / "train").is_dir()
    return root


def pretrain(project: Path, name: str, *args: str) -> Path:
    out = project / "runs" / name
    result = runner.invoke(app, ["pretrain", VARIANT, "--params", str(project / "params.yaml"), "--out", str(out),
                                 "--device", "cpu", "--quiet", *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def runs(project) -> dict[str, Path]:
    args = ("--set", "num_proxy=2")
    return {"seed3": pretrain(project, "seed3", *args, "--seed", "3"),
            "seed3-again": pretrain(project, "seed3-again", *args, "--seed", "3"),
            "seed4": pretrain(project, "seed4", *args, "--seed", "4")}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_the_run_records_the_overrides_the_seed_and_the_resolved_recipe(runs):
    params = json.loads((runs["seed3"] / "run.json").read_text())["params"]
    assert params["overrides"] == {"num_proxy": 2}
    assert params["resolved_recipe"]["num_proxy"] == 2
    assert params["run"]["seed"] == 3
    assert params["variants"][VARIANT]["num_proxy"] == 8  # the profile's value, as the profile states it
    (proxy,) = [tensor for name, tensor in weights(runs["seed3"]).items() if name.endswith("proxy_tokens")]
    assert proxy.shape[1] == 2  # the model was built with the override, not only recorded with it


def test_the_same_seed_gives_bitwise_equal_weights_and_another_seed_other_weights(runs):
    first, again, other = weights(runs["seed3"]), weights(runs["seed3-again"]), weights(runs["seed4"])
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    differing = [name for name in first if first[name].is_floating_point() and not torch.equal(first[name],
                                                                                              other[name])]
    assert len(differing) > len(first) // 2, differing
