"""Classification fine-tuning (`semanticmim.eval.finetune`): layer-wise lr decay scales, Mixup in training
only, evaluation in eval mode, both heads as separate fine-tunes, top-5 only beyond 5 classes, and
one-line errors for bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from support import export_tiny_encoder
from typer.testing import CliRunner

from semanticmim.cli import app
from semanticmim.config import RunParams
from semanticmim.data.embedded import generate_embedded
from semanticmim.data.transforms import normalize
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.optim import build_schedule
from semanticmim.errors import InputError
from semanticmim.eval import finetune
from semanticmim.eval.encoder import load_encoder

runner = CliRunner()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A random-init 3-block, 32-d encoder with K=2 proxies, exported to timm."""
    return export_tiny_encoder(tmp_path_factory.mktemp("encoder"), depth=3)


@pytest.fixture(scope="module")
def embedded_data(tmp_path_factory) -> Path:
    """The embedded dataset: 10 classes, 64 train / 32 val images of 32 px."""
    root = tmp_path_factory.mktemp("embedded")
    generate_embedded(root / "data", image_size=32, train=64, val=32, seed=0, workers=1)
    return root / "data" / "classification"


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    """4 classes of solid-colour 32-px images, 8 train / 4 val per class."""
    root = tmp_path_factory.mktemp("colour")
    for split, count in (("train", 8), ("val", 4)):
        for label in range(4):
            for index in range(count):
                path = root / split / f"class{label}" / f"{index}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (60 * label, 255 - 60 * label, 100)).save(path)
    return root


def settings(**overrides) -> finetune.Settings:
    values = dict(epochs=2, batch_size=16, lr_batch=16, num_workers=0,
                  run=RunParams(checkpoint_every=1000, log_every=1))
    return finetune.Settings(**{**values, **overrides})


def run(encoder: Path, data: Path, out: Path, **overrides) -> dict:
    return finetune.evaluate(encoder, data, "imagefolder", settings(**overrides), out, DistEnv(), quiet=True)


def test_layer_decay_gives_each_block_its_lr_scale(encoder_dir):
    encoder = load_encoder(encoder_dir, drop_path_rate=0.1)
    model = finetune.Classifier(encoder.model, num_classes=5, pooling="cls")
    optimizer = torch.optim.AdamW(finetune.layer_decay_groups(model, 0.05, 0.65), lr=1.0)
    build_schedule(optimizer, total_steps=10, warmup_steps=0, min_lr=0.0).step_update(0)
    lr_of, decay_of = {}, {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            lr_of[param], decay_of[param] = group["lr"], group["weight_decay"]
    depth = encoder.depth  # 3: stem 0.65^4, block b 0.65^(4-b), final norm and head 1
    expected = {"pos_embed": 0.65 ** (depth + 1), "cls_token": 0.65 ** (depth + 1), "reg_token": 0.65 ** (depth + 1),
                "patch_embed.proj.weight": 0.65 ** (depth + 1), "norm.weight": 1.0, "head.weight": 1.0}
    expected |= {f"blocks.{b - 1}.attn.qkv.weight": 0.65 ** (depth + 1 - b) for b in range(1, depth + 1)}
    names = {name.removeprefix("encoder."): param for name, param in model.named_parameters()}
    for name, scale in expected.items():
        assert lr_of[names[name]] == pytest.approx(scale), name
    assert len(lr_of) == len(names)  # every parameter is optimized
    assert decay_of[names["blocks.0.attn.qkv.weight"]] == 0.05 and decay_of[names["head.weight"]] == 0.05
    for name in ("pos_embed", "cls_token", "reg_token", "norm.weight", "blocks.0.attn.qkv.bias", "head.bias"):
        assert decay_of[names[name]] == 0.0, name


def test_finetune_both_heads_mixup_in_training_only(encoder_dir, embedded_data, tmp_path, monkeypatch):
    mixed, forward_modes = [], []
    build_mixup = finetune.build_mixup

    def spying_mixup(*args, **kwargs):
        mixup = build_mixup(*args, **kwargs)

        def call(images, labels):
            mixed.append(torch.is_grad_enabled())
            return type(mixup).__call__(mixup, images, labels)

        return call

    forward = finetune.Classifier.forward

    def recording_forward(self, images):
        forward_modes.append((torch.is_grad_enabled(), self.training, self.encoder.training))
        return forward(self, images)

    monkeypatch.setattr(finetune, "build_mixup", spying_mixup)
    monkeypatch.setattr(finetune.Classifier, "forward", recording_forward)
    result = run(encoder_dir, embedded_data, tmp_path / "out")
    steps, val_batches = 2 * 64 // 16, 32 // 16
    assert mixed == [True] * steps * 2  # every training step of both heads, never in evaluation
    training = [mode for mode in forward_modes if mode[0]]
    evaluation = [mode for mode in forward_modes if not mode[0]]
    assert training == [(True, True, True)] * steps * 2
    assert evaluation == [(False, False, False)] * val_batches * 2 * 2  # 2 epochs x 2 heads, eval mode
    for key in ("top1", "top5", "best_epoch_top1", "best_epoch", "top1_cls", "top5_cls", "best_epoch_cls",
                "top1_patch", "top5_patch", "best_epoch_top1_patch"):
        assert key in result, key
    assert result["top1"] == result["top1_cls"]
    used = result["used"]
    assert used["layer_decay"] == 0.65 and used["drop_path"] == 0.1 and used["heads"] == ["cls", "patch"]
    assert "weight decay 0.0001" in used["optimizer"]
    assert used["layer_lr_scales"]["block3"] == pytest.approx(0.65)
    for head in ("cls", "patch"):
        assert (tmp_path / "out" / head / "history.json").is_file()
        assert (tmp_path / "out" / head / "dvclive" / "plots" / "metrics" / "eval" / "top1.tsv").is_file()


def test_top5_only_beyond_five_classes_and_plain_label_smoothing(encoder_dir, colour_data, tmp_path):
    result = run(encoder_dir, colour_data, tmp_path / "out", heads=["patch"], mixup=0.0, cutmix=0.0, epochs=1)
    assert "top5" not in result and "top1_patch" in result and "top1_cls" not in result
    assert result["headline"]["head"] == "patch"


def test_odd_per_device_batch_with_mixup_is_refused(encoder_dir, colour_data, tmp_path):
    with pytest.raises(InputError, match="must be even"):
        run(encoder_dir, colour_data, tmp_path / "out", batch_size=15)


def test_cli_refuses_a_class_count_that_does_not_match_the_data(encoder_dir, colour_data, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"eval": {"finetune_cls": {"num_classes": 1000, "epochs": 1}}}))
    result = runner.invoke(app, ["eval", "finetune-cls", "--encoder", str(encoder_dir), "--data", str(colour_data),
                                 "--format", "imagefolder", "--params", str(params), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "num_classes=1000 but" in result.output and "has 4 classes" in result.output


def test_a_third_party_timm_vit_with_fc_norm_and_no_class_token(colour_data, tmp_path):
    """A hand-made export of a timm ViT (mean-pooled, `fc_norm`, no prefix tokens): `patch` fine-tunes, with
    `fc_norm` at the top lr scale; `cls` is a one-line error."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="avg")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
    folder = tmp_path / "third_party"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "kwargs": kwargs}))
    classifier = finetune.Classifier(load_encoder(folder).model, num_classes=4, pooling="patch")
    scales = {id(p): group["lr_scale"] for group in finetune.layer_decay_groups(classifier, 0.05, 0.65)
              for p in group["params"]}
    assert scales[id(classifier.encoder.fc_norm.weight)] == 1.0
    assert scales[id(classifier.encoder.blocks[1].mlp.fc1.weight)] == pytest.approx(0.65)
    assert scales[id(classifier.encoder.pos_embed)] == pytest.approx(0.65 ** 3)
    result = run(folder, colour_data, tmp_path / "out", heads=["patch"], epochs=1)
    assert "top1_patch" in result and result["used"]["encoder_depth"] == 2
    with pytest.raises(InputError, match="'cls' needs prefix"):
        run(folder, colour_data, tmp_path / "out_cls", heads=["cls"], epochs=1)


def test_task_normalises_and_erases_on_the_device_reproducibly(encoder_dir):
    """uint8 views in; the model sees normalised images with one erased box each (p=1), drawn from the
    step's torch RNG alone, so Python's `random` state (unknown after a resume) changes nothing."""
    model = finetune.Classifier(load_encoder(encoder_dir).model, num_classes=3, pooling="cls")
    task = finetune.FinetuneTask(model, mixup=None, label_smoothing=0.0, erase_prob=1.0)
    pixels = torch.full((4, 3, 32, 32), 200, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    seen = []

    def module(images):
        seen.append(images.clone())
        return model(images)

    for python_seed in (1, 2):
        random.seed(python_seed)
        torch.manual_seed(0)
        task.loss(module, (pixels, labels), step=0)
    assert torch.equal(seen[0], seen[1])
    clean = normalize(pixels)
    erased = (seen[0] != clean).any(1)  # (B, H, W)
    for sample in erased:
        rows, cols = sample.any(1).nonzero(), sample.any(0).nonzero()
        assert 0 < sample.sum() < 32 * 32 / 3 + 64  # timm's area (0.02, 1/3) of the image
        box = sample[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.95  # one solid rectangle
    assert torch.equal(seen[0][~erased[:, None].expand_as(clean)], clean[~erased[:, None].expand_as(clean)])
