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
from semanticmim.targets import DalleTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "target_floor.py"
spec = importlib.util.spec_from_file_location("target_floor", SCRIPT)
target_floor = importlib.util.module_from_spec(spec)
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
    hog = target_floor.floors("hog", tmp_path / "data", img_size=16, patch_size=4, tokenizer=None)
    assert hog["per_position_mean"] < hog["global_mean"] < hog["zero"]
    torch.manual_seed(0)
    tokenizer = DalleTokenizer(vocab_size=8, n_hid=4, group_count=1, n_blk_per_group=1)
    tokenizer.save_safetensors(tmp_path / "tokenizer.safetensors")
    tokens = target_floor.floors("dvae", tmp_path / "data", img_size=16, patch_size=4,
                                 tokenizer=tmp_path / "tokenizer.safetensors")
    assert tokens["per_position_frequency"] <= tokens["uniform"] == pytest.approx(math.log(8))


def test_with_run_reports_how_far_below_the_best_constant(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text(json.dumps({"final_loss": 0.5}))
    result = target_floor.with_run({"zero": 2.0, "per_position_mean": 1.0}, tmp_path)
    assert result["below_best_constant"] == pytest.approx(0.5)


def test_bad_inputs_are_one_line_errors(tmp_path: Path, data_files) -> None:
    data_files["image"](tmp_path / "data" / "train" / "a" / "0.png")
    with pytest.raises(InputError, match="no val/ or test/ split"):
        target_floor.floors("hog", tmp_path / "data", img_size=16, patch_size=4, tokenizer=None)
    data_files["image"](tmp_path / "data" / "val" / "a" / "0.png")
    with pytest.raises(InputError, match="--tokenizer is required"):
        target_floor.floors("dvae", tmp_path / "data", img_size=16, patch_size=4, tokenizer=None)
    with pytest.raises(InputError, match=r"metrics\.json: not found"):
        target_floor.with_run({"zero": 1.0}, tmp_path / "nowhere")
    done = subprocess.run([sys.executable, str(SCRIPT), "hog", str(tmp_path / "missing"), "--img-size", "16"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip().startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
