"""Classification linear probe (`semanticmim.eval.linear`) and the shared bookkeeping (`eval.metrics`):
it reads labels from features that carry them and stays at chance on noise, trains the whole grid on
one backbone pass through the engine's loop (both modes), leaves the frozen backbone bitwise unchanged,
resumes to the same heads, keeps the last epoch apart from the best one, writes numbers only to its
metrics (under its mode), and turns bad input into one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from support import export_tiny_encoder
from typer.testing import CliRunner

from semanticmim.data.embedded import generate_embedded
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.history import History
from semanticmim.engine.loop import RunOptions
from semanticmim.errors import InputError
from semanticmim.eval import linear
from semanticmim.eval.encoder import Encoder
from semanticmim.eval.metrics import check_numbers, fingerprint
from stages.cli import app

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
                  run=RunOptions(checkpoint_every=1000, log_every=1))
    return linear.Settings(**{**values, **overrides})


def probe(encoder: Path, data: Path, out: Path, **overrides) -> dict:
    """The protocol's {"metrics", "run"}, with the metrics checked to be numbers only."""
    result = linear.evaluate(encoder, data, "imagefolder", settings(**overrides), out, DistEnv(), quiet=True)
    assert set(result) == {"metrics", "run"}
    check_numbers(result["metrics"])
    assert json.dumps(result)  # plain JSON
    return result


def numbers(result: dict) -> dict:
    """The metrics of the mode that produced them (the only key of the metrics)."""
    (mode,) = result["metrics"]
    return result["metrics"][mode]


# ------------------------------------------------------------------------------------------ learning


def test_probe_reads_labels_carried_by_features_and_stays_at_chance_on_noise(encoder_dir, colour_data, noise_data,
                                                                              tmp_path):
    learned = numbers(probe(encoder_dir, colour_data, tmp_path / "colour", mode="cached", epochs=15))
    assert learned["top1"] >= 95 and learned["top1_cls"] >= 95 and learned["top1_patch"] >= 95
    assert "top5" not in learned  # 4 classes: top-5 is meaningless
    noise = numbers(probe(encoder_dir, noise_data, tmp_path / "noise", mode="cached", epochs=15))
    assert noise["top1"] <= 55 and noise["top1_patch"] <= 55  # chance is 25% (24 validation images)


def test_paper_and_cached_modes_agree_on_an_easy_task_but_never_share_a_metric_name(encoder_dir, colour_data,
                                                                                   tmp_path):
    paper = probe(encoder_dir, colour_data, tmp_path / "paper", mode="paper", epochs=4)
    cached = probe(encoder_dir, colour_data, tmp_path / "cached", mode="cached", epochs=4)
    assert paper["run"]["used"]["mode"] == "paper" and cached["run"]["used"]["mode"] == "cached"
    # `dvc metrics diff` flattens nested keys (paper.top1 vs cached.top1): unlike numbers are never compared
    assert set(paper["metrics"]) == {"paper"} and set(cached["metrics"]) == {"cached"}
    assert set(paper["run"]["headline"]) == {"paper.top1"} and set(cached["run"]["headline"]) == {"cached.top1"}
    assert numbers(paper)["top1"] >= 90 and numbers(cached)["top1"] >= 90
    assert abs(numbers(paper)["top1_patch"] - numbers(cached)["top1_patch"]) <= 10
    for result in (paper, cached):  # both trained by the engine: same plan, its outputs
        assert result["run"]["batch_plan"]["total_steps"] == 4 * 64 // 16
        assert json.loads((tmp_path / result["run"]["used"]["mode"] / "history.json").read_text())["unit"] == "epoch"


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
    run, metrics = result["run"], result["metrics"]["paper"]
    assert len(run["grid"]) == 3 * 2 * 2 and run["used"]["grid"]["heads"] == 12
    assert run["used"]["block"] == 2  # block 7 of 12 at the depth of 3
    for key in ("top1", "top5", "top1_cls", "top5_cls", "top1_patch", "best_epoch_top1", "best_epoch",
                "best_epoch_top1_cls", "best_epoch_patch"):
        assert key in metrics, key
    assert "grid" not in metrics and "used" not in metrics  # diagnostics and settings go to run.json
    assert metrics["top1"] == metrics["top1_cls"] == run["grid"]["block2/cls/lr0.01"]["top1"]
    assert run["headline"] == {"paper.top1": metrics["top1"], "paper.top5": metrics["top5"]}
    assert run["timing"]["backbone_images"] == steps * 16 + 32
    assert run["used"]["grid"]["lrs_scaled"] == [1e-3, 1e-2]  # lr_batch 16 = the global batch: unscaled
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


@pytest.mark.parametrize(("mode", "task"), [("paper", linear.ProbeTask), ("cached", linear.CachedProbeTask)])
def test_both_modes_resume_to_the_same_heads(mode, task, encoder_dir, embedded_data, tmp_path, monkeypatch):
    whole = probe(encoder_dir, embedded_data, tmp_path / "whole", mode=mode, epochs=2)
    original = task.loss

    def interrupted(self, module, batch, step):
        if step == 5:  # the second step of epoch 2 (4 steps per epoch), after the first evaluation
            raise KeyboardInterrupt
        return original(self, module, batch, step)

    monkeypatch.setattr(task, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        probe(encoder_dir, embedded_data, tmp_path / "resumed", mode=mode, epochs=2)
    monkeypatch.setattr(task, "loss", original)
    evaluations = []
    evaluate_heads = linear.evaluate_heads
    monkeypatch.setattr(linear, "evaluate_heads", lambda *a, **k: evaluations.append(1) or evaluate_heads(*a, **k))
    resumed = probe(encoder_dir, embedded_data, tmp_path / "resumed", mode=mode, epochs=2)
    assert len(evaluations) == 1  # epoch 1's evaluation is not repeated
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert resumed["metrics"] == whole["metrics"]


def test_cached_features_are_extracted_once(encoder_dir, embedded_data, tmp_path, monkeypatch):
    first = probe(encoder_dir, embedded_data, tmp_path / "out", mode="cached", epochs=2)
    assert (tmp_path / "out" / "features" / "train.safetensors").is_file()
    calls = []
    monkeypatch.setattr(Encoder, "block_tokens", lambda self, images, blocks: calls.append(1))
    rerun = probe(encoder_dir, embedded_data, tmp_path / "out", mode="cached", epochs=2)  # all done already
    assert rerun["metrics"] == first["metrics"] and rerun["run"]["grid"] == first["run"]["grid"]
    shutil.rmtree(tmp_path / "out" / "checkpoints")  # another recipe (these checkpoints would be refused)
    other_lr = probe(encoder_dir, embedded_data, tmp_path / "out", mode="cached", epochs=2, lr=3e-3)
    assert not calls and other_lr["run"]["used"]["lr"] == 3e-3  # trained on the cached features, no backbone pass


# ------------------------------------------------------------------------------------- bookkeeping


def test_headline_is_the_last_epoch_and_the_best_is_labelled_under_the_mode():
    history = History(unit="epoch")
    for epoch, top1 in ((1, 50.0), (2, 70.0), (3, 60.0)):
        history.record(epoch, {"block2/cls/lr0.01/top1": top1, "block2/patch/lr0.01/top1": top1 - 10})
    specs = [linear.HeadSpec(2, "cls", 0.01), linear.HeadSpec(2, "patch", 0.01)]
    metrics, details = linear.summarise(history, settings(lr=0.01, mode="cached"), specs, block=2, num_classes=4)
    assert metrics == {"cached": {"top1": 60.0, "best_epoch_top1": 70.0, "best_epoch": 2,
                                  "top1_cls": 60.0, "best_epoch_top1_cls": 70.0, "best_epoch_cls": 2,
                                  "top1_patch": 50.0, "best_epoch_top1_patch": 60.0, "best_epoch_patch": 2}}
    assert details["headline_head"] == {"head": "block2/cls/lr0.01", "epoch": 3, "mode": "cached"}
    assert details["grid"]["block2/patch/lr0.01"] == {"top1": 50.0, "best_epoch_top1": 60.0, "best_epoch": 2}
    check_numbers(metrics)
    with pytest.raises(TypeError, match="numbers only"):
        check_numbers({"cached": metrics["cached"], "used": {"mode": "cached"}})


def test_one_fingerprint_ignores_how_a_run_executes_but_not_what_it_computes():
    base = fingerprint(settings(), encoder="abc")
    same = settings(num_workers=4, eval_every=3, batch_per_device=8,
                    run=RunOptions(checkpoint_every=7, log_every=5, keep_checkpoints=1, quiet=True, num_workers=3))
    assert fingerprint(same, encoder="abc") == base and len(base) == 16
    for other in (settings(lr=2e-2), settings(mode="cached"), settings(run=RunOptions(seed=1))):
        assert fingerprint(other, encoder="abc") != base
    assert fingerprint(settings(), encoder="other weights") != base


def test_features_are_normalised_with_the_encoders_own_mean_and_std(encoder_dir, tmp_path):
    folder = shutil.copytree(encoder_dir, tmp_path / "encoder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mean": [0.5] * 3, "std": [0.25] * 3}))
    encoder = linear.load_encoder(folder)
    seen = []
    encoder.block_tokens = lambda images, blocks: seen.append(images) or [(images.new_zeros(1, 2, 32),
                                                                           images.new_zeros(1, 16, 32))]
    pixels = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    linear.ProbeFeatures(encoder, [(1, "cls")], layer_norm=True)(pixels)
    torch.testing.assert_close(seen[0], torch.full((1, 3, 32, 32), 2.0))  # (1 - 0.5) / 0.25, not ImageNet's


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


@pytest.mark.parametrize("problem", ["num_classes", "val_class", "empty_val", "grid_block", "layout", "one_class",
                                     "img_size"])
def test_bad_data_and_settings_are_one_line_input_errors(problem, encoder_dir, colour_data, tmp_path):
    data, overrides, layout = colour_data, {}, "imagefolder"
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
    elif problem == "one_class":
        data = tmp_path / "data"
        for split in ("train", "val"):
            shutil.copytree(colour_data / split / "class0", data / split / "class0")
        expected = r"split 'train' has 1 class \['class0'\]; a classifier needs at least 2"
    elif problem == "img_size":
        overrides, expected = {"img_size": 36}, "eval.linear_cls.img_size=36: expected a positive multiple of the patch"
    else:
        layout, expected = "voc", "classification protocols read imagefolder or imagenet"
    with pytest.raises(InputError, match=expected) as error:
        linear.evaluate(encoder_dir, data, layout, settings(**overrides), tmp_path / "out", DistEnv(), quiet=True)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused up front, before any training


def test_an_encoder_without_prefix_tokens_probes_patch_and_refuses_cls_in_one_line(colour_data, tmp_path):
    """A timm ViT with `class_token=False, global_pool="avg"` (timm returns bare patch tensors for it)."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="avg")
    folder = tmp_path / "gap"
    folder.mkdir()
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs).state_dict(),
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "kwargs": kwargs}))
    result = probe(folder, colour_data, tmp_path / "patch", mode="cached", epochs=1, poolings=["patch"])
    assert set(numbers(result)) >= {"top1", "top1_patch"} and "top1_cls" not in numbers(result)
    expected = r"eval.linear_cls.poolings: .* no prefix tokens .*poolings: \[patch\]"
    with pytest.raises(InputError, match=expected) as error:
        probe(folder, colour_data, tmp_path / "cls", mode="cached", epochs=1)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ real files


def test_real_cifar_jpegs(data_cifar_test, encoder_dir, tmp_path):
    """CIFAR-10's JPEG ImageFolder (its `test` folder, 20 images per class) through the cached probe."""
    result = probe(encoder_dir, data_cifar_test, tmp_path / "out", mode="cached", epochs=2, train_split="test",
                   val_split="test")
    assert result["run"]["used"]["val"]["images"] == 200 and result["run"]["used"]["num_classes"] == 10
    assert 0 <= numbers(result)["top1"] <= 100 and "top5" in numbers(result)
