"""scripts/target_floor.py: the constant-predictor loss a MIM target's pretraining must beat."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semanticmim.errors import InputError
from semanticmim.models import build_model
from semanticmim.models.factory import hog_dim
from semanticmim.targets import DalleTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "target_floor.py"
spec = importlib.util.spec_from_file_location("target_floor", SCRIPT)
target_floor = importlib.util.module_from_spec(spec)
sys.modules["target_floor"] = target_floor  # a dataclass in it looks its module up
spec.loader.exec_module(target_floor)


def test_hog_floors_order_and_vanish_for_a_constant_target() -> None:
    torch.manual_seed(0)
    position_means = torch.rand(1, 4, 6)
    train = position_means + 0.1 * torch.randn(200, 4, 6)
    held_out = position_means + 0.1 * torch.randn(100, 4, 6)
    losses = target_floor.hog_constant_losses(train, held_out)
    assert losses["per_position_mean"] < losses["global_mean"] < losses["zero"]
    assert losses["per_position_mean"] == pytest.approx(0.01, rel=0.15)  # what is left: the noise variance
    same = position_means.expand(5, 4, 6)
    assert target_floor.hog_constant_losses(same, same)["per_position_mean"] == pytest.approx(0.0, abs=1e-12)


def test_token_floors_know_a_position_that_always_has_the_same_token() -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 16
    train = torch.randint(vocab, (400, 3), generator=generator)
    train[:, 0] = 5  # position 0 always token 5: its per-position frequency predicts it almost surely
    held_out = torch.randint(vocab, (200, 3), generator=generator)
    held_out[:, 0] = 5
    losses = target_floor.token_constant_losses(train, held_out, vocab)
    assert losses["uniform"] == pytest.approx(math.log(vocab))
    assert losses["per_position_frequency"] < losses["global_frequency"] < losses["uniform"]
    # positions 1 and 2 uniform (~log 16), position 0 ~ -log(401/416): the mean of the three
    assert losses["per_position_frequency"] == pytest.approx((2 * math.log(vocab) - math.log(401 / 416)) / 3, rel=0.02)


def test_floors_on_an_imagefolder_for_both_targets(tmp_path: Path, data_files) -> None:
    for split, count in (("train", 6), ("val", 3)):
        for i in range(count):
            data_files["image"](tmp_path / "data" / split / "a" / f"{i}.png", size=(20, 16), seed=i)
    hog = target_floor.floors(target_floor.load_targets("hog", tmp_path / "data", 16, 4, None), neighbours=True)
    assert hog["per_position_mean"] < hog["global_mean"] < hog["zero"]
    assert {"interior_per_position_mean", "interior_neighbour_linear"} <= hog.keys()
    torch.manual_seed(0)
    tokenizer = DalleTokenizer(vocab_size=8, n_hid=4, group_count=1, n_blk_per_group=1)
    tokenizer.save_safetensors(tmp_path / "tokenizer.safetensors")
    tokens = target_floor.floors(target_floor.load_targets("dvae", tmp_path / "data", 16, 4,
                                                           tmp_path / "tokenizer.safetensors"))
    assert tokens["per_position_frequency"] <= tokens["uniform"] == pytest.approx(math.log(8))


def smooth_field(count: int, grid: int, channels: int) -> torch.Tensor:
    """(count, grid * grid, channels): a 3 x 3 box filter of noise, so each patch is predictable from its
    neighbours."""
    noise = torch.randn(count, channels, grid + 2, grid + 2)
    return torch.nn.functional.avg_pool2d(noise, 3, 1).permute(0, 2, 3, 1).flatten(1, 2)


def test_neighbour_predictor_finds_context_when_there_is_some_and_none_when_there_is_none() -> None:
    torch.manual_seed(0)
    smooth = smooth_field(400, 6, 2)
    found = target_floor.hog_neighbour_losses(smooth[:300], smooth[300:], grid=6, mask_ratio=0.6)
    # box-filtered noise shares 2/3 to 4/9 of its inputs with each neighbour: most of it is explained
    assert found["interior_neighbour_linear"] < 0.3 * found["interior_per_position_mean"]
    # hiding 60 % of the neighbours leaves less to read, but still some
    assert (found["interior_neighbour_linear"] < found["interior_neighbour_linear_masked"]
            < found["interior_per_position_mean"])
    independent = torch.randn(400, 36, 2)
    none = target_floor.hog_neighbour_losses(independent[:300], independent[300:], grid=6)
    assert none["interior_neighbour_linear"] == pytest.approx(none["interior_per_position_mean"], rel=0.05)
    with pytest.raises(InputError, match="no interior patch"):
        target_floor.hog_neighbour_losses(independent[:, :4], independent[:, :4], grid=2)


def tiny_hog_model(constant: float):
    """A MaskFeat model on a 4 x 4 grid whose head ignores its input and outputs `constant` everywhere."""
    model = build_model(block="vit", img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2).eval()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.constant_(model.head.bias, constant)
    return model


def test_held_out_model_loss_is_scored_against_the_constant_on_the_same_patches() -> None:
    torch.manual_seed(0)
    images = torch.randn(6, 3, 16, 16)
    dim = hog_dim(4)
    train = torch.full((10, 16, dim), 0.5)
    held_out = 0.5 + 0.1 * torch.randn(6, 16, dim)
    targets = target_floor.Targets(train, held_out, images)
    same = target_floor.held_out_model_losses(tiny_hog_model(0.5), targets, mask_ratio=0.5)
    assert same["held_out_model"] == pytest.approx(same["held_out_per_position_constant"])
    assert same["held_out_model_below_constant"] == pytest.approx(0.0, abs=1e-9)
    off = target_floor.held_out_model_losses(tiny_hog_model(0.8), targets, mask_ratio=0.5)
    # a prediction 0.3 off the constant adds 0.3 ** 2 to its MSE
    assert off["held_out_model"] == pytest.approx(off["held_out_per_position_constant"] + 0.09, rel=0.05)
    assert off["held_out_model_below_constant"] < 0


def test_held_out_model_loss_of_a_uniform_token_predictor_is_log_vocab() -> None:
    model = build_model(block="beit", img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2,
                        target_dim=8).eval()
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    generator = torch.Generator().manual_seed(0)
    targets = target_floor.Targets(torch.randint(8, (20, 16), generator=generator),
                                   torch.randint(8, (6, 16), generator=generator), torch.randn(6, 3, 16, 16), 8)
    losses = target_floor.held_out_model_losses(model, targets, mask_ratio=0.4)
    assert losses["held_out_model"] == pytest.approx(math.log(8))


def test_mask_ratio_comes_from_the_runs_resolved_recipe() -> None:
    record = {"stage": "pretrain@maskfeat", "params": {"recipe": {"epochs": 3}, "variants": {"maskfeat": {}}}}
    assert target_floor.run_mask_ratio(record) == 0.4  # the baseline's (paper §4.1)
    record["stage"] = "pretrain@maskfeat-semanticmim"
    assert target_floor.run_mask_ratio(record) == 0.6
    record["params"]["variants"]["maskfeat-semanticmim"] = {"mask_ratio": 0.75}
    assert target_floor.run_mask_ratio(record) == 0.75


def test_with_run_reports_how_far_below_the_best_constant(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"final_loss": 0.5}))
    (tmp_path / "run.json").write_text(json.dumps({"stage": "pretrain@maskfeat", "params": {}}))
    result = target_floor.with_run({"zero": 2.0, "per_position_mean": 1.0}, tmp_path)
    assert result["below_best_constant"] == pytest.approx(0.5)


def test_bad_inputs_are_one_line_errors(tmp_path: Path, data_files) -> None:
    data_files["image"](tmp_path / "data" / "train" / "a" / "0.png")
    with pytest.raises(InputError, match="no val/ or test/ split"):
        target_floor.load_targets("hog", tmp_path / "data", 16, 4, None)
    data_files["image"](tmp_path / "data" / "val" / "a" / "0.png")
    with pytest.raises(InputError, match="--tokenizer is required"):
        target_floor.load_targets("dvae", tmp_path / "data", 16, 4, None)
    with pytest.raises(InputError, match=r"metrics\.json: not found"):
        target_floor.with_run({"zero": 1.0}, tmp_path / "nowhere")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"final_loss": 0.5}))
    with pytest.raises(InputError, match=r"run\.json: not found"):
        target_floor.with_run({"zero": 1.0}, tmp_path / "run", targets=None)
    tokens = target_floor.Targets(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                                  torch.zeros(2, 3, 8, 8), vocab_size=8)
    with pytest.raises(InputError, match="--neighbours is for hog only"):
        target_floor.floors(tokens, neighbours=True)
    done = subprocess.run([sys.executable, str(SCRIPT), "hog", str(tmp_path / "missing"), "--img-size", "16"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
