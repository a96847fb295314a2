"""Classification linear probe (`semanticmim.eval.linear`) and the shared bookkeeping (`eval.metrics`):
it reads labels from features that carry them and stays at chance on noise, trains the whole grid on
one backbone pass, leaves the frozen backbone bitwise unchanged, resumes to the same heads, keeps the
last epoch apart from the best one, and turns bad input into one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from support import export_tiny_encoder
from typer.testing import CliRunner

from semanticmim.cli import app
from semanticmim.config import RunParams
from semanticmim.data.embedded import generate_embedded
from semanticmim.engine.distributed import DistEnv
from semanticmim.errors import InputError
from semanticmim.eval import linear
from semanticmim.eval import metrics as eval_metrics
from semanticmim.eval.encoder import Encoder
from semanticmim.eval.metrics import EpochHistory, evaluation_epochs

COLOURS = ((230, 40, 40), (40, 200, 60), (40, 60, 230), (220, 220, 40))
runner = CliRunner()


def write_folder(root: Path, per_class: dict[str, int], labelled_by_colour: bool, seed: int) -> Path:
    """ImageFolder of 32-px PNGs, 4 classes: a class colour + noise, or pure noise in a random class."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for index in range(count * len(COLOURS)):
            label = index % len(COLOURS) if labelled_by_colour else int(rng.integers(len(COLOURS)))
            if labelled_by_colour:
                pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
            else:
                pixels = rng.integers(0, 256, (32, 32, 3))
            path = root / split / f"class{label}" / f"{index:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return export_tiny_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("colour"), {"train": 16, "val": 6}, True, seed=0)


@pytest.fixture(scope="module")
def noise_data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("noise"), {"train": 16, "val": 6}, False, seed=1)


@pytest.fixture(scope="module")
def embedded_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embedded")
    generate_embedded(root / "data", image_size=32, train=64, val=32, seed=0, workers=1)
    return root / "data" / "classification"


def settings(**overrides) -> linear.Settings:
    values = dict(epochs=3, batch_size=16, lr_batch=16, lr=1e-2, num_workers=0,
                  run=RunParams(checkpoint_every=1000, log_every=1))
    return linear.Settings(**{**values, **overrides})


def probe(encoder: Path, data: Path, out: Path, **overrides) -> dict:
    return linear.evaluate(encoder, data, "imagefolder", settings(**overrides), out, DistEnv(), quiet=True)


# ------------------------------------------------------------------------------------------ learning


def test_probe_reads_labels_carried_by_features_and_stays_at_chance_on_noise(encoder_dir, colour_data, noise_data,
                                                                              tmp_path):
    learned = probe(encoder_dir, colour_data, tmp_path / "colour", mode="cached", epochs=15)
    assert learned["top1"] >= 95 and learned["top1_cls"] >= 95 and learned["top1_patch"] >= 95
    assert "top5" not in learned  # 4 classes: top-5 is meaningless
    noise = probe(encoder_dir, noise_data, tmp_path / "noise", mode="cached", epochs=15)
    assert noise["top1"] <= 55 and noise["top1_patch"] <= 55  # chance is 25% (24 validation images)


def test_paper_and_cached_modes_agree_on_an_easy_task(encoder_dir, colour_data, tmp_path):
    paper = probe(encoder_dir, colour_data, tmp_path / "paper", mode="paper", epochs=4)
    cached = probe(encoder_dir, colour_data, tmp_path / "cached", mode="cached", epochs=4)
    assert paper["used"]["mode"] == "paper" and cached["used"]["mode"] == "cached"
    assert paper["top1"] >= 90 and cached["top1"] >= 90
    assert abs(paper["top1_patch"] - cached["top1_patch"]) <= 10


# --------------------------------------------------------------------------------- one pass, frozen


def test_grid_trains_every_head_on_one_frozen_backbone_pass(encoder_dir, embedded_data, tmp_path, monkeypatch):
    calls: list[list[int]] = []
    captured: list[Encoder] = []
    block_tokens, load_encoder = Encoder.block_tokens, linear.load_encoder

    def counting(self, images, blocks):
        calls.append(list(blocks))
        return block_tokens(self, images, blocks)

    def capturing(*args, **kwargs):
        captured.append(load_encoder(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(Encoder, "block_tokens", counting)
    monkeypatch.setattr(linear, "load_encoder", capturing)
    result = probe(encoder_dir, embedded_data, tmp_path / "out", epochs=2, grid_blocks=[1, "last"], grid_lrs=[1e-3])
    steps, val_batches = 2 * 64 // 16, 32 // 16
    assert len(calls) == steps + val_batches  # one backbone pass per step feeds all 12 heads
    assert all(blocks == [1, 2, 3] for blocks in calls)
    assert len(result["grid"]) == 3 * 2 * 2 and result["used"]["grid"]["heads"] == 12
    assert result["used"]["block"] == 2  # block 7 of 12 at the depth of 3
    for key in ("top1", "top5", "top1_cls", "top5_cls", "top1_patch", "best_epoch_top1", "best_epoch",
                "best_epoch_top1_cls", "best_epoch_patch"):
        assert key in result, key
    assert result["top1"] == result["top1_cls"] == result["grid"]["block2/cls/lr0.01"]["top1"]
    assert result["timing"]["backbone_images"] == steps * 16 + 32
    # the frozen backbone: eval mode, no gradients, weights bitwise those of the file
    encoder = captured[0]
    assert not encoder.model.training and not any(p.requires_grad for p in encoder.model.parameters())
    on_disk = load_file(str(encoder_dir / "model.safetensors"))
    state = encoder.model.state_dict()
    assert len(state) > 10
    for name, tensor in state.items():
        assert torch.equal(tensor.cpu(), on_disk[name]), name
    heads = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert len([name for name in heads if name.endswith("weight")]) == 12
    curves = tmp_path / "out" / "dvclive" / "plots" / "metrics"
    assert (curves / "train" / "loss.tsv").is_file()
    assert (curves / "eval" / "block2" / "cls" / "lr0.01" / "top1.tsv").is_file()


def test_paper_mode_resumes_to_the_same_heads(encoder_dir, embedded_data, tmp_path, monkeypatch):
    whole = probe(encoder_dir, embedded_data, tmp_path / "whole", epochs=2)
    log_curves = eval_metrics.log_curves

    def killed_after_first_evaluation(*args, **kwargs):
        log_curves(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_metrics, "log_curves", killed_after_first_evaluation)
    with pytest.raises(KeyboardInterrupt):
        probe(encoder_dir, embedded_data, tmp_path / "resumed", epochs=2)
    monkeypatch.setattr(eval_metrics, "log_curves", log_curves)
    resumed = probe(encoder_dir, embedded_data, tmp_path / "resumed", epochs=2)
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert resumed["top1"] == whole["top1"] and resumed["best_epoch"] == whole["best_epoch"]


def test_cached_features_are_extracted_once(encoder_dir, embedded_data, tmp_path, monkeypatch):
    first = probe(encoder_dir, embedded_data, tmp_path / "out", mode="cached", epochs=2)
    assert (tmp_path / "out" / "features" / "train.safetensors").is_file()
    calls = []
    monkeypatch.setattr(Encoder, "block_tokens", lambda self, images, blocks: calls.append(1))
    rerun = probe(encoder_dir, embedded_data, tmp_path / "out", mode="cached", epochs=2)  # all done already
    assert rerun["top1"] == first["top1"] and rerun["grid"] == first["grid"]
    shutil.rmtree(tmp_path / "out" / "checkpoints")  # another recipe (these checkpoints would be refused)
    other_lr = probe(encoder_dir, embedded_data, tmp_path / "out", mode="cached", epochs=2, lr=3e-3)
    assert not calls and other_lr["used"]["lr"] == 3e-3  # trained on the cached features, no backbone pass


# ------------------------------------------------------------------------------------- bookkeeping


def test_headline_is_the_last_epoch_and_the_best_is_labelled(tmp_path):
    history = EpochHistory.load(tmp_path / "history.json", "abc")
    for epoch, top1 in ((1, 50.0), (2, 70.0), (3, 60.0)):
        history.record(epoch, {"head/top1": top1, "head/top5": top1 + 20})
    summary = history.summary("head/", ["top1", "top5"], "top1", suffix="_cls")
    assert summary == {"top1_cls": 60.0, "top5_cls": 80.0, "best_epoch_top1_cls": 70.0, "best_epoch_top5_cls": 90.0,
                       "best_epoch_cls": 2}
    assert EpochHistory.load(tmp_path / "history.json", "abc").records == history.records
    assert EpochHistory.load(tmp_path / "history.json", "other settings").records == []
    assert evaluation_epochs(10, 3) == [3, 6, 9, 10] and evaluation_epochs(2, 5) == [2]


# -------------------------------------------------------------------------------------- bad input


def write_params(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump({"eval": {"linear_cls": {"epochs": 1, "batch_size": 16, "num_workers": 0,
                                                            **values}}}))
    return path


@pytest.mark.parametrize("what", ["empty folder", "pretraining checkpoint"])
def test_cli_refuses_what_is_not_a_timm_encoder_export(what, encoder_dir, embedded_data, tmp_path):
    params = write_params(tmp_path / "params.yaml")
    encoder = tmp_path if what == "empty folder" else encoder_dir.parent / "model.safetensors"
    result = runner.invoke(app, ["eval", "linear-cls", "--encoder", str(encoder), "--data", str(embedded_data),
                                 "--format", "imagefolder", "--params", str(params), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "not a timm-format encoder export" in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_refuses_a_block_outside_the_depth(encoder_dir, embedded_data, tmp_path):
    params = write_params(tmp_path / "params.yaml", block=7)
    result = runner.invoke(app, ["eval", "linear-cls", "--encoder", str(encoder_dir), "--data", str(embedded_data),
                                 "--format", "imagefolder", "--params", str(params), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "block=7 is outside the encoder's blocks 1..3" in result.output


def test_weights_that_do_not_match_the_architecture(encoder_dir, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(encoder_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["extra.weight"] = torch.zeros(1)
    del state["blocks.0.norm1.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match=r"does not match .*missing \['blocks.0.norm1.weight'\].*extra.weight"):
        probe(folder, tmp_path, tmp_path / "out")


@pytest.mark.parametrize("problem", ["num_classes", "val_class", "empty_val", "grid_block", "format"])
def test_bad_data_and_settings_are_one_line_input_errors(problem, encoder_dir, colour_data, tmp_path):
    data, overrides, fmt = colour_data, {}, "imagefolder"
    if problem == "num_classes":
        overrides, expected = {"num_classes": 10}, "num_classes=10 but .* has 4 classes"
    elif problem == "val_class":
        data = shutil.copytree(colour_data, tmp_path / "data")
        shutil.copytree(data / "val" / "class0", data / "val" / "zebra")
        expected = "zebra: class folder not in the class list"
    elif problem == "empty_val":
        data = shutil.copytree(colour_data, tmp_path / "data")
        for image in (data / "val").rglob("*.png"):
            image.unlink()
        expected = "no images found"
    elif problem == "grid_block":
        overrides, expected = {"grid_blocks": [4]}, "grid_blocks=4 is outside the encoder's blocks 1..3"
    else:
        fmt, expected = "voc", "classification protocols read imagefolder or imagenet"
    with pytest.raises(InputError, match=expected) as error:
        linear.evaluate(encoder_dir, data, fmt, settings(**overrides), tmp_path / "out", DistEnv(), quiet=True)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ real files


def test_real_cifar_jpegs(data_cifar_test, encoder_dir, tmp_path):
    """CIFAR-10's JPEG ImageFolder (its `test` folder, 20 images per class) through the cached probe."""
    result = probe(encoder_dir, data_cifar_test, tmp_path / "out", mode="cached", epochs=2, train_split="test",
                   val_split="test")
    assert result["used"]["val"]["images"] == 200 and result["used"]["num_classes"] == 10
    assert 0 <= result["top1"] <= 100 and "top5" in result
    assert json.dumps(result)  # metrics are plain JSON
