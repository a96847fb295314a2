"""Classification fine-tuning (`semanticmim.eval.finetune`): layer-wise lr decay scales (every prefix token
in the stem, whatever timm's matcher says), the authors' head (pooled raw tokens, a new LayerNorm), the
paper and authors' presets with their sources, Mixup in training only, evaluation in eval mode, both
heads as separate fine-tunes, top-5 only beyond 5 classes, numbers-only metrics, and one-line errors
for bad input."""

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

from semanticmim.data.embedded import generate_embedded
from semanticmim.data.transforms import normalize
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.loop import RunOptions
from semanticmim.engine.optim import build_schedule
from semanticmim.errors import InputError
from semanticmim.eval import finetune, layer_decay
from semanticmim.eval.encoder import load_encoder
from semanticmim.eval.metrics import check_numbers
from stages.cli import app

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
                  run=RunOptions(checkpoint_every=1000, log_every=1))
    return finetune.Settings(**{**values, **overrides})


def run(encoder: Path, data: Path, out: Path, **overrides) -> dict:
    """The protocol's {"metrics", "run"}, with the metrics checked to be numbers only."""
    result = finetune.evaluate(encoder, data, "imagefolder", settings(**overrides), out, DistEnv(), quiet=True)
    assert set(result) == {"metrics", "run"}
    check_numbers(result["metrics"])
    assert json.dumps(result)
    return result


def lr_scales(model: torch.nn.Module, weight_decay: float = 0.05) -> tuple[dict, dict]:
    """{parameter name: lr scale}, {parameter name: weight decay} of the layer-decay groups."""
    names = {id(param): name for name, param in model.named_parameters()}
    scales, decays = {}, {}
    for group in layer_decay.layer_decay_groups(model, weight_decay, 0.65):
        for param in group["params"]:
            scales[names[id(param)]], decays[names[id(param)]] = group["lr_scale"], group["weight_decay"]
    return scales, decays


def test_layer_decay_gives_each_block_its_lr_scale(encoder_dir):
    encoder = load_encoder(encoder_dir, drop_path_rate=0.1)
    model = finetune.Classifier(encoder.model, num_classes=5, pooling="cls")
    optimizer = torch.optim.AdamW(layer_decay.layer_decay_groups(model, 0.05, 0.65), lr=1.0)
    build_schedule(optimizer, total_steps=10, warmup_steps=0, min_lr=0.0).step_update(0)
    lr_of, decay_of = {}, {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            lr_of[param], decay_of[param] = group["lr"], group["weight_decay"]
    depth = encoder.depth  # 3: stem 0.65^4, block b 0.65^(4-b), the new head norm and the head 1
    expected = {"encoder.pos_embed": 0.65 ** (depth + 1), "encoder.cls_token": 0.65 ** (depth + 1),
                "encoder.reg_token": 0.65 ** (depth + 1), "encoder.patch_embed.proj.weight": 0.65 ** (depth + 1),
                "head_norm.weight": 1.0, "head.weight": 1.0}
    expected |= {f"encoder.blocks.{b - 1}.attn.qkv.weight": 0.65 ** (depth + 1 - b) for b in range(1, depth + 1)}
    names = dict(model.named_parameters())
    for name, scale in expected.items():
        assert lr_of[names[name]] == pytest.approx(scale), name
    assert len(lr_of) == len(names)  # every parameter is optimized
    assert "encoder.norm.weight" not in names  # fresh: the final norm is dropped, not left untrained
    assert decay_of[names["encoder.blocks.0.attn.qkv.weight"]] == 0.05 and decay_of[names["head.weight"]] == 0.05
    for name in ("encoder.pos_embed", "encoder.cls_token", "encoder.reg_token", "head_norm.weight",
                 "encoder.blocks.0.attn.qkv.bias", "head.bias"):
        assert decay_of[names[name]] == 0.0, name


@pytest.mark.parametrize("protocol", ["finetune", "upernet"])
def test_every_prefix_token_gets_the_stems_lr_scale_whatever_timms_matcher_says(encoder_dir, protocol, monkeypatch):
    """timm < 1.0.28's ViT matcher had no `reg_token` in its stem (7 of 8 proxies decayed at the head's
    scale): with that matcher, the class token AND the registers still get the stem's scale."""
    from timm.models.vision_transformer import VisionTransformer

    def old_matcher(self, coarse=False):
        blocks = [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]
        return {"stem": r"^cls_token|pos_embed|patch_embed", "blocks": blocks}

    monkeypatch.setattr(VisionTransformer, "group_matcher", old_matcher)
    monkeypatch.setattr(VisionTransformer, "no_weight_decay", lambda self: {"pos_embed", "cls_token"})
    encoder = load_encoder(encoder_dir)
    if protocol == "finetune":
        model, prefix = finetune.Classifier(encoder.model, num_classes=5, pooling="cls"), "encoder."
    else:
        from semanticmim.eval.segmentation import upernet

        fast = upernet.Settings(decoder_channels=8, aux_channels=8)
        model, prefix = upernet.build_segmenter(encoder.model, (1, 2, 3, 3), 5, fast), "backbone.vit."
    scales, decays = lr_scales(model)
    stem = scales[f"{prefix}pos_embed"]
    assert stem == pytest.approx(0.65 ** (encoder.depth + 1))
    assert encoder.model.reg_token.shape[1] >= 1  # the export has registers (K - 1 proxies)
    for token in ("cls_token", "reg_token"):
        assert scales[f"{prefix}{token}"] == stem and decays[f"{prefix}{token}"] == 0.0, token


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
    metrics = result["metrics"]
    steps, val_batches = 2 * 64 // 16, 32 // 16
    assert mixed == [True] * steps * 2  # every training step of both heads, never in evaluation
    training = [mode for mode in forward_modes if mode[0]]
    evaluation = [mode for mode in forward_modes if not mode[0]]
    assert training == [(True, True, True)] * steps * 2
    assert evaluation == [(False, False, False)] * val_batches * 2 * 2  # 2 epochs x 2 heads, eval mode
    for key in ("top1", "top5", "best_epoch_top1", "best_epoch", "top1_cls", "top5_cls", "best_epoch_cls",
                "top1_patch", "top5_patch", "best_epoch_top1_patch"):
        assert key in metrics, key
    assert metrics["top1"] == metrics["top1_cls"] and result["run"]["headline"]["top1"] == metrics["top1"]
    used = result["run"]["used"]
    assert used["layer_decay"] == 0.65 and used["drop_path"] == 0.1 and used["heads"] == ["cls", "patch"]
    assert "weight decay 0.0001" in used["optimizer"] and used["preset"] == "paper" and used["min_lr"] == 0.0
    assert used["layer_lr_scales"]["block3"] == pytest.approx(0.65)
    assert result["run"]["sources"]["weight_decay"].startswith("paper Table 3")
    for head in ("cls", "patch"):
        assert (tmp_path / "out" / head / "history.json").is_file()
        assert (tmp_path / "out" / head / "dvclive" / "plots" / "metrics" / "eval" / "top1.tsv").is_file()


def test_top5_only_beyond_five_classes_and_plain_label_smoothing(encoder_dir, colour_data, tmp_path):
    result = run(encoder_dir, colour_data, tmp_path / "out", heads=["patch"], mixup=0.0, cutmix=0.0, epochs=1)
    metrics = result["metrics"]
    assert "top5" not in metrics and "top1_patch" in metrics and "top1_cls" not in metrics
    assert result["run"]["headline_head"] == "patch" and set(result["run"]["headline"]) == {"top1"}


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
    scales = {id(p): group["lr_scale"] for group in layer_decay.layer_decay_groups(classifier, 0.05, 0.65)
              for p in group["params"]}
    assert scales[id(classifier.encoder.fc_norm.weight)] == 1.0
    assert scales[id(classifier.encoder.blocks[1].mlp.fc1.weight)] == pytest.approx(0.65)
    assert scales[id(classifier.encoder.pos_embed)] == pytest.approx(0.65 ** 3)
    assert classifier.head_norm is None  # its own fc_norm is the pooled tokens' norm
    result = run(folder, colour_data, tmp_path / "out", heads=["patch"], epochs=1)
    assert "top1_patch" in result["metrics"] and result["run"]["used"]["encoder_depth"] == 2
    with pytest.raises(InputError, match=r"eval.finetune_cls.heads: .* no prefix tokens .* heads: \[patch\]"):
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


# ------------------------------------------------------------------------------ head, presets, inputs


@pytest.mark.parametrize("pooling", ["cls", "patch"])
def test_fresh_head_pools_raw_tokens_then_a_new_layernorm_and_final_applies_the_final_norm(encoder_dir, pooling):
    """fresh [authors' code, MAE/BEiT]: mean of the last block's raw tokens, a new LayerNorm, the Linear;
    final: the encoder's final norm on the tokens, then the mean and the Linear."""
    images = torch.randn(2, 3, 32, 32)
    reference = load_encoder(encoder_dir).model.eval()
    with torch.no_grad():  # the last block's output, by hand
        raw = reference.blocks(reference.norm_pre(reference._pos_embed(reference.patch_embed(images))))
    prefix = reference.num_prefix_tokens
    for feature_norm in ("fresh", "final"):
        model = finetune.Classifier(load_encoder(encoder_dir).model, 4, pooling, feature_norm).eval()
        tokens = raw if feature_norm == "fresh" else reference.norm(raw)
        pooled = (tokens[:, :prefix] if pooling == "cls" else tokens[:, prefix:]).mean(1)
        norm = model.head_norm if feature_norm == "fresh" else torch.nn.Identity()
        with torch.no_grad():
            torch.testing.assert_close(model(images), model.head(norm(pooled)))
        assert (model.head_norm is not None) == (feature_norm == "fresh")
        assert isinstance(model.encoder.norm, torch.nn.Identity) == (feature_norm == "fresh")


def test_presets_paper_by_default_authors_config_on_request_and_params_win():
    paper = finetune.Settings()
    assert (paper.preset, paper.weight_decay, paper.warmup_epochs, paper.min_lr) == ("paper", 1e-4, 0.0, 0.0)
    assert paper.feature_norm == "fresh"
    authors = finetune.Settings(preset="authors")
    assert (authors.weight_decay, authors.warmup_epochs, authors.min_lr) == (0.05, 20.0, 1e-6)
    mixed = finetune.Settings.model_validate({"preset": "authors", "warmup_epochs": 5})
    assert (mixed.weight_decay, mixed.warmup_epochs) == (0.05, 5.0)
    sources = finetune.value_sources(mixed, finetune.SOURCES, finetune.PRESETS["authors"], finetune.PRESET_SOURCE)
    assert sources["weight_decay"].startswith("preset authors") and sources["warmup_epochs"] == "params"
    assert sources["lr"] == "paper Table 3" and sources["min_lr"].startswith("preset authors")
    defaults = finetune.value_sources(paper, finetune.SOURCES)
    assert defaults["min_lr"] == "paper Table 3: 0 (authors' code: 1e-6)"


def test_the_authors_preset_is_recorded_with_what_it_does_not_reproduce(encoder_dir, colour_data, tmp_path):
    result = run(encoder_dir, colour_data, tmp_path / "out", heads=["patch"], epochs=1, preset="authors",
                 mixup=0.0, cutmix=0.0)
    used = result["run"]["used"]
    assert used["preset"] == "authors" and used["weight_decay"] == 0.05 and used["warmup_epochs"] == 20.0
    assert "ColorJitter" in result["run"]["notes"]["authors_preset_not_reproduced"]
    assert result["run"]["sources"]["weight_decay"].startswith("preset authors")


@pytest.mark.parametrize("problem", ["one_class", "img_size"])
def test_bad_inputs_are_one_line_errors_before_any_training(problem, encoder_dir, colour_data, tmp_path):
    data, overrides = colour_data, {}
    if problem == "one_class":
        data = tmp_path / "data"
        for split in ("train", "val"):
            (data / split / "only").mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(data / split / "only" / "0.png")
        expected = "has 1 class ['only']; a classifier needs at least 2"
    else:
        overrides, expected = {"img_size": 36}, "eval.finetune_cls.img_size=36: expected a positive multiple of the"
    with pytest.raises(InputError) as error:
        run(encoder_dir, data, tmp_path / "out", heads=["patch"], epochs=1, **overrides)
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
