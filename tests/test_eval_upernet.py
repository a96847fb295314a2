"""ADE20K UperNet fine-tuning (`semanticmim eval finetune-seg`): the decoder against its spec, sliding-window
inference, the optimizer recipe (the shared layer decay), a step-based run through the engine's loop
with resume, numbers-only metrics, and bad input as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import export_tiny_encoder
from torch import nn
from typer.testing import CliRunner

from semanticmim.data.embedded import generate_embedded
from semanticmim.engine.distributed import DistEnv
from semanticmim.engine.history import evaluation_points
from semanticmim.eval.encoder import load_encoder
from semanticmim.eval.metrics import check_numbers
from semanticmim.eval.segmentation import upernet
from semanticmim.eval.segmentation.inference import slide_inference, whole_inference, window_starts
from stages.cli import app

runner = CliRunner()
FAST = {
    "steps": 4,
    "eval_interval": 2,
    "batch_size": 8,
    "crop_size": 32,
    "warmup_steps": 1,
    "lr": 1e-3,
    "decoder_channels": 16,
    "aux_channels": 8,
    "num_workers": 0,
    "run": {"checkpoint_every": 1, "log_every": 1},
}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A random-init BEiT+SemanticMIM encoder (32 px, patch 8, 32-d, 4 blocks, K=2) in timm format."""
    return export_tiny_encoder(tmp_path_factory.mktemp("encoder"), "beit-semanticmim", depth=4)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embedded") / "data"
    generate_embedded(root, image_size=32, train=16, val=4, workers=1)
    return root / "segmentation"


def segmenter(encoder_dir: Path, num_classes: int = 5, **overrides) -> upernet.UperNetSegmenter:
    settings = upernet.Settings.model_validate({**FAST, **overrides})
    vit = load_encoder(encoder_dir, img_size=settings.crop_size).model
    return upernet.build_segmenter(vit, (1, 2, 3, 4), num_classes, settings).eval()


# -------------------------------------------------------------------------------------------- spec


def test_pyramid_has_strides_p4_p2_p_2p(encoder_dir):
    model = segmenter(encoder_dir)
    levels = model.backbone(torch.randn(2, 3, 64, 96))  # patch 8: an 8 x 12 grid
    assert [tuple(x.shape) for x in levels] == [(2, 32, 32, 48), (2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6)]
    fpn1 = [type(m) for m in model.backbone.fpn1]
    assert fpn1 == [nn.ConvTranspose2d, nn.BatchNorm2d, nn.GELU, nn.ConvTranspose2d]
    assert isinstance(model.backbone.fpn3, nn.Identity) and isinstance(model.backbone.fpn4, nn.MaxPool2d)
    logits, aux = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 5, 32, 48) and aux.shape == (2, 5, 8, 12)  # strides p/4 and p


def test_uperhead_matches_the_mmseg_structure(encoder_dir):
    head = segmenter(encoder_dir, decoder_channels=24, aux_channels=8).decode_head
    assert [stage[0].output_size for stage in head.psp.stages] == [1, 2, 3, 6]  # PPM bins
    assert all(stage[1][0].in_channels == 32 and stage[1][0].out_channels == 24 for stage in head.psp.stages)
    assert head.bottleneck[0].in_channels == 32 + 4 * 24 and head.bottleneck[0].kernel_size == (3, 3)
    assert [(c[0].in_channels, c[0].out_channels, c[0].kernel_size) for c in head.lateral_convs] == [
        (32, 24, (1, 1))
    ] * 3
    assert [(c[0].in_channels, c[0].kernel_size) for c in head.fpn_convs] == [(24, (3, 3))] * 3
    assert head.fpn_bottleneck[0].in_channels == 4 * 24 and head.fpn_bottleneck[0].out_channels == 24
    assert all(isinstance(c[1], nn.BatchNorm2d) and c[0].bias is None for c in [*head.lateral_convs, *head.fpn_convs])
    assert (head.classifier.in_channels, head.classifier.out_channels) == (24, 5) and head.dropout.p == 0.1
    aux = segmenter(encoder_dir, aux_channels=8).auxiliary_head
    assert (aux.convs[0][0].in_channels, aux.convs[0][0].out_channels, aux.classifier.in_channels) == (32, 8, 8)
    defaults = upernet.Settings()
    assert (defaults.decoder_channels, defaults.pool_scales, defaults.aux_channels, defaults.aux_weight) == (
        768,
        (1, 2, 3, 6),
        256,
        0.4,
    )
    assert (
        defaults.lr,
        defaults.layer_decay,
        defaults.warmup_steps,
        defaults.steps,
        defaults.batch_size,
        defaults.crop_size,
    ) == (3e-5, 0.9, 1500, 160_000, 16, 640)


def test_layer_decay_and_no_weight_decay_groups(encoder_dir):
    model = segmenter(encoder_dir)
    groups = upernet.layer_decay_groups(model, weight_decay=0.05, layer_decay=0.9)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["backbone.vit.pos_embed"])]["lr_scale"] == pytest.approx(0.9**5)
    assert by_param[id(named["backbone.vit.pos_embed"])]["weight_decay"] == 0.0
    for token in ("cls_token", "reg_token"):  # every prefix token (class token and proxies) in the stem
        assert by_param[id(named[f"backbone.vit.{token}"])]["lr_scale"] == pytest.approx(0.9**5), token
        assert by_param[id(named[f"backbone.vit.{token}"])]["weight_decay"] == 0.0, token
    assert by_param[id(named["backbone.vit.blocks.0.attn.qkv.weight"])]["lr_scale"] == pytest.approx(0.9**4)
    assert by_param[id(named["backbone.vit.blocks.3.mlp.fc1.weight"])]["lr_scale"] == pytest.approx(0.9)
    assert by_param[id(named["backbone.vit.blocks.3.mlp.fc1.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["decode_head.classifier.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["decode_head.classifier.weight"])]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_warmup_then_linear_decay():
    optimizer = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}], lr=1.0)
    schedule = upernet.WarmupPolySchedule(optimizer, base_lr=1.0, total_steps=100, warmup_steps=10)
    assert schedule.lr_at(0) == pytest.approx(1e-6)
    assert schedule.lr_at(5) == pytest.approx(0.95 * 0.5, rel=1e-4)
    assert schedule.lr_at(10) == pytest.approx(0.9) and schedule.lr_at(100) == 0.0
    schedule.step_update(50)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)


# --------------------------------------------------------------------------------------- inference


def test_window_grid_is_mmseg_slide():
    assert window_starts(640, 640, 426) == [0]
    assert window_starts(854, 640, 426) == [0, 214]
    assert window_starts(1300, 640, 426) == [0, 426, 660]
    assert window_starts(300, 640, 426) == [0]


def test_slide_equals_whole_inference_when_the_window_covers_the_image(encoder_dir):
    model = segmenter(encoder_dir)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            slide_inference(model.predict, images, crop=32, stride=21), whole_inference(model.predict, images)
        )


def test_overlapping_windows_are_averaged_back_to_the_whole_image():
    """A per-pixel model gives the same logits whichever window a pixel is seen in: sliding must then
    reproduce whole-image inference exactly, overlaps and borders included."""
    pixelwise = nn.Conv2d(3, 4, 1)
    images = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(
            slide_inference(pixelwise, images, crop=32, stride=20, windows_per_batch=3),
            whole_inference(pixelwise, images),
        )
        small = slide_inference(pixelwise, images[..., :20, :24], crop=32, stride=20)  # padded window
        torch.testing.assert_close(small, whole_inference(pixelwise, images[..., :20, :24]))


def test_a_run_is_measured_in_steps_and_evaluates_every_interval_and_at_the_end():
    settings = upernet.Settings.model_validate({**FAST, "steps": 10, "eval_interval": 4})  # 4 need not divide 10
    schedule, plan = settings.schedule(num_samples=16, world_size=1)
    assert (schedule.steps, plan.total_steps, plan.steps_per_epoch, schedule.epochs) == (10, 10, 2, 5)
    assert schedule.lr == pytest.approx(1e-3)  # Table 4's lr at its own batch: not rescaled
    assert evaluation_points(plan.total_steps, settings.eval_interval) == [4, 8, 10]


# ------------------------------------------------------------------------------------ end to end


def cli_args(encoder_dir: Path, data: Path, params: Path, out: Path) -> list[str]:
    return ["eval", "finetune-seg", "--encoder", str(encoder_dir), "--data", str(data), "--format", "voc",
            "--params", str(params), "--out", str(out)]


def test_finetune_end_to_end_and_a_rerun_trains_and_evaluates_nothing(encoder_dir, embedded, tmp_path, monkeypatch):
    settings = upernet.Settings.model_validate(FAST)
    out = tmp_path / "out"
    result = upernet.evaluate(encoder_dir, embedded, "voc", settings, out, DistEnv(), quiet=True)
    metrics, run = result["metrics"], result["run"]
    check_numbers(metrics)
    assert json.dumps(result)
    assert [entry["step"] for entry in run["evaluations"]] == [2, 4] and run["evaluated_at"] == {"step": 4}
    assert metrics["miou"] == run["evaluations"][-1]["miou"] and {"best_step_miou", "best_step"} <= set(metrics)
    assert run["used"]["blocks"] == [1, 2, 3, 4] and run["used"]["slide_stride"] == 21
    assert run["encoder"]["sha256"] and len(run["per_class_iou"]) == 16 and len(run["classes"]) == 16
    assert (out / "dvclive" / "plots" / "metrics" / "eval" / "miou.tsv").is_file()
    weights = (out / "model.safetensors").read_bytes()
    calls = []
    evaluate_dataset = upernet.evaluate_dataset
    monkeypatch.setattr(upernet, "evaluate_dataset", lambda *a, **k: calls.append(1) or evaluate_dataset(*a, **k))
    again = upernet.evaluate(encoder_dir, embedded, "voc", settings, out, DistEnv(), quiet=True)
    assert not calls and again["metrics"] == metrics and again["run"]["evaluations"] == run["evaluations"]
    assert (out / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"blocks": [1, 2, 3, 9]}, "blocks=9 is outside the encoder's blocks 1..4"),
        ({"num_classes": 150}, "num_classes=150 but"),
        ({"crop_size": 36}, "eval.finetune_seg.crop_size=36: expected a positive multiple of the patch size 8"),
        ({"ratio_range": [2.0, 1.0]}, "ratio_range must satisfy 0 < low <= high"),
    ],
)
def test_bad_settings_are_one_line_cli_errors(encoder_dir, embedded, tmp_path, overrides, message):
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  finetune_seg: " + json.dumps({**FAST, **overrides}) + "\n")
    result = runner.invoke(app, cli_args(encoder_dir, embedded, params, tmp_path / "out"))
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1
