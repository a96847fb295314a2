"""PascalVOC linear segmentation (`semanticmim eval linear-seg`): the mIoU maths, the frozen 1x1 probe,
resume, and bad input as one-line errors."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from support import export_tiny_encoder
from typer.testing import CliRunner

from semanticmim.cli import app
from semanticmim.data.embedded import generate_embedded
from semanticmim.engine.distributed import DistEnv
from semanticmim.errors import InputError
from semanticmim.eval.encoder import load_encoder
from semanticmim.eval.segmentation import linear
from semanticmim.eval.segmentation.miou import ConfusionMatrix, iou_per_class, scores
from semanticmim.eval.segmentation.protocol import scaled_blocks

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CPU = DistEnv()
FAST = {
    "epochs": 2,
    "batch_size": 16,
    "eval_every": 1,
    "num_workers": 0,
    "eval_batch_size": 16,
    "img_size": 64,
    "train_resolution": 16,
    "run": {"checkpoint_every": 3, "log_every": 1},
}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return export_tiny_encoder(tmp_path_factory.mktemp("encoder"), depth=2)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embedded") / "data"
    generate_embedded(root, image_size=32, train=32, val=16, workers=1)
    return root / "segmentation"


def colour_pairs(root: Path, count: dict[str, int], size: int = 32, label_value: int | None = None) -> Path:
    """A crafted easy task in the `pairs` layout: 8x8 cells coloured black/red/blue, label = the colour."""
    colours = np.array([[0, 0, 0], [220, 30, 30], [30, 30, 220]], dtype=np.uint8)
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True), (root / "labels").mkdir()
    (root / "classes.txt").write_text("black\nred\nblue\n")
    for split, n in count.items():
        names = [f"{split}_{i}" for i in range(n)]
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            cells = rng.integers(0, 3, (size // 8, size // 8))
            label = np.kron(cells, np.ones((8, 8), dtype=np.int64))
            Image.fromarray(colours[label]).save(root / "images" / f"{name}.png")
            if label_value is not None:
                label[0, 0] = label_value
            Image.fromarray(label.astype(np.uint8)).save(root / "labels" / f"{name}.png")
    return root


def run_linear(encoder_dir: Path, data: Path, fmt: str, out: Path, **overrides) -> dict:
    settings = linear.Settings.model_validate({**FAST, **overrides})
    return linear.evaluate(encoder_dir, data, fmt, settings, out, CPU, quiet=True)


# ------------------------------------------------------------------------------------------- mIoU


def test_miou_matches_a_hand_computed_confusion_matrix():
    """4 classes; class 3 never occurs nor is predicted (absent: NaN, left out of the mean); 255 ignored."""
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    matrix = ConfusionMatrix(4)
    matrix.update(predicted, labels)
    counts = matrix.compute()
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2], expected[2, 0] = 1, 1, 2, 1, 1
    assert torch.equal(counts, expected)  # the two 255 pixels count nowhere
    iou = iou_per_class(counts)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert math.isnan(iou[3])
    result = scores(counts, ("a", "b", "c", "d"))
    assert result["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(100 * 4 / 6)
    assert result["per_class_iou"]["d"] is None and result["classes_scored"] == 3
    assert result["chance_miou"] == pytest.approx(100 * (2 / 6) / 3)  # the most frequent class is 1 of 3 present


def test_a_class_predicted_but_absent_from_the_ground_truth_scores_zero():
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 0]))
    result = scores(matrix.compute(), ("a", "b", "c"))
    assert result["per_class_iou"] == {"a": pytest.approx(100 * 2 / 3), "b": None, "c": 0.0}
    assert result["miou"] == pytest.approx(100 * 2 / 3 / 2)


def test_confusion_matrix_refuses_labels_outside_the_head():
    with pytest.raises(InputError, match=r"label value 5 outside the head's classes 0\.\.2"):
        ConfusionMatrix(3).update(torch.tensor([0, 1]), torch.tensor([0, 5]))


def test_block_indices_scale_with_depth():
    assert scaled_blocks([6], 12) == (6,) and scaled_blocks([6], 4) == (2,) and scaled_blocks([6], 1) == (1,)
    assert scaled_blocks([4, 6, 8, 12], 12) == (4, 6, 8, 12) and scaled_blocks([4, 6, 8, 12], 4) == (1, 2, 3, 4)
    defaults = linear.Settings()
    assert (defaults.epochs, defaults.batch_size, defaults.lr, defaults.momentum) == (25, 120, 0.01, 0.9)


# ------------------------------------------------------------------------------------------ probe


def test_probe_learns_a_crafted_task_and_the_encoder_stays_bitwise_frozen(encoder_dir, tmp_path, monkeypatch):
    built, build_task = [], linear.build_task

    def capture(*args, **kwargs):
        built.append(build_task(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(linear, "build_task", capture)
    data = colour_pairs(tmp_path / "pairs", {"train": 48, "val": 8})
    metrics = run_linear(
        encoder_dir, data, "pairs", tmp_path / "out", block=1, epochs=6, eval_every=3, lr=0.1, crop_scale=(0.5, 1.0)
    )
    assert metrics["miou"] > 80, metrics["evaluations"]
    assert metrics["chance_miou"] < 20
    assert [entry["at"] for entry in metrics["evaluations"]] == [{"epoch": 3}, {"epoch": 6}]
    assert metrics["used"]["block"] == 1 and metrics["used"]["optimizer"] == "SGD"
    fresh = load_encoder(encoder_dir, img_size=64).model.state_dict()  # pos-embed resampled the same way
    frozen = built[0].features.vit.state_dict()
    assert frozen and all(torch.equal(tensor, fresh[name]) for name, tensor in frozen.items())
    assert not any(p.requires_grad for p in built[0].features.parameters())
    assert not built[0].features.training


def test_an_encoder_that_sees_nothing_scores_no_better_than_chance(encoder_dir, tmp_path):
    """Zero patch embedding and position embedding: every token is the same, whatever the image, so the
    probe can only predict one class everywhere; the best such prediction is the chance level."""
    blind = tmp_path / "blind"
    blind.mkdir()
    (blind / "config.json").write_text((encoder_dir / "config.json").read_text())
    state = load_file(str(encoder_dir / "model.safetensors"))
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"):
        state[name] = torch.zeros_like(state[name])
    save_file(state, str(blind / "model.safetensors"))
    data = colour_pairs(tmp_path / "pairs", {"train": 32, "val": 8})
    metrics = run_linear(blind, data, "pairs", tmp_path / "out", block=1, epochs=3, lr=0.1)
    assert metrics["miou"] <= metrics["chance_miou"] + 1e-6, metrics
    assert metrics["best_miou_on_eval_set"]["miou"] <= metrics["chance_miou"] + 1e-6


def test_resume_after_an_interrupt_reaches_the_same_head(encoder_dir, embedded, tmp_path, monkeypatch):
    whole = run_linear(encoder_dir, embedded, "voc", tmp_path / "whole")
    original = linear.LinearSegmentationTask.loss

    def interrupted(self, module, batch, step):
        if step == 3:  # the second step of epoch 2 (2 steps per epoch), after the first evaluation
            raise KeyboardInterrupt
        return original(self, module, batch, step)

    monkeypatch.setattr(linear.LinearSegmentationTask, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_linear(encoder_dir, embedded, "voc", tmp_path / "resumed")
    monkeypatch.setattr(linear.LinearSegmentationTask, "loss", original)
    resumed = run_linear(encoder_dir, embedded, "voc", tmp_path / "resumed")
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["evaluations"] == whole["evaluations"]
    assert resumed["miou"] == whole["miou"] and resumed["used"]["block"] == 1  # block 6 of 12 -> 1 of 2


# -------------------------------------------------------------------------------------- bad input


def test_cli_reports_a_missing_encoder_as_one_line(embedded, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  linear_seg: {epochs: 1}\n")
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "linear-seg",
            "--encoder",
            str(tmp_path / "nothing"),
            "--data",
            str(embedded),
            "--format",
            "voc",
            "--params",
            str(params),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "not a timm-format encoder" in result.output


def test_weights_that_do_not_match_are_one_line_errors(encoder_dir, embedded, tmp_path):
    folder = tmp_path / "other"
    export_tiny_encoder(folder, depth=3)
    (folder / "encoder" / "config.json").write_text((encoder_dir / "config.json").read_text())  # says depth 2
    with pytest.raises(InputError, match="unexpected"):
        run_linear(folder / "encoder", embedded, "voc", tmp_path / "out")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block": 3}, "block=3 is outside the encoder's blocks 1..2"),
        ({"num_classes": 21}, "num_classes=21 but .* has 16 classes"),
        ({"val_split": "missing"}, "split list not found"),
    ],
)
def test_bad_settings_are_one_line_errors(encoder_dir, embedded, tmp_path, overrides, message):
    with pytest.raises(InputError, match=message) as error:
        run_linear(encoder_dir, embedded, "voc", tmp_path / "out", **overrides)
    assert "\n" not in str(error.value)


def test_empty_split_and_labels_outside_the_classes_are_one_line_errors(encoder_dir, tmp_path):
    empty = colour_pairs(tmp_path / "empty", {"train": 4, "val": 2})
    (empty / "val.txt").write_text("")
    with pytest.raises(InputError, match=r"lists no images|has no images"):
        run_linear(encoder_dir, empty, "pairs", tmp_path / "out1")
    wrong = colour_pairs(tmp_path / "wrong", {"train": 16, "val": 2}, label_value=7)
    with pytest.raises(InputError, match=r"label value\(s\) \[7\] outside"):
        run_linear(encoder_dir, wrong, "pairs", tmp_path / "out2")
    with pytest.raises(InputError, match="segmentation protocols read one of"):
        run_linear(encoder_dir, wrong, "imagefolder", tmp_path / "out3")


# ------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED_DATA / "camvid.tar.gz").is_file(), reason="CamVid archive not at hand")
def test_camvid_in_the_pairs_layout(encoder_dir, tmp_path):
    with tarfile.open(SHARED_DATA / "camvid.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    root = next(path.parent for path in tmp_path.rglob("classes.txt"))
    for split in ("train", "val"):  # a few images each keep the test short
        names = sorted(path.stem for path in (root / split).iterdir())[:8]
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    metrics = run_linear(encoder_dir, root, "pairs", tmp_path / "out", epochs=1, batch_size=8)
    assert metrics["splits"]["train_images"] == 8 and len(metrics["classes"]) == 11
    assert 0 <= metrics["miou"] <= 100
