"""PascalVOC linear segmentation (`semanticmim eval linear-seg`): the mIoU maths, the authors' defaults
(with their sources), the frozen 1x1 probe on raw block tokens, the step schedule, the encoder's own
normalisation, resume through the engine's loop, numbers-only metrics, and bad input as one-line errors."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from support import export_tiny_encoder
from typer.testing import CliRunner

from semanticmim.data.embedded import generate_embedded
from semanticmim.data.transforms import normalize
from semanticmim.engine.distributed import DistEnv
from semanticmim.errors import InputError
from semanticmim.eval.encoder import Normalization, load_encoder
from semanticmim.eval.metrics import check_numbers
from semanticmim.eval.segmentation import linear
from semanticmim.eval.segmentation.miou import ConfusionMatrix, iou_per_class, scores
from semanticmim.eval.segmentation.protocol import EncoderNormalized, scaled_blocks
from stages.cli import app

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CPU = DistEnv()
FAST = {
    "epochs": 2,
    "batch_size": 16,
    "lr_batch": 16,  # the lr as given
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


def run_linear(encoder_dir: Path, data: Path, layout: str, out: Path, **overrides) -> dict:
    """The protocol's {"metrics", "run"}, with the metrics checked to be numbers only."""
    settings = linear.Settings.model_validate({**FAST, **overrides})
    result = linear.evaluate(encoder_dir, data, layout, settings, out, CPU, quiet=True)
    assert set(result) == {"metrics", "run"}
    check_numbers(result["metrics"])
    return result


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


def test_defaults_are_the_papers_and_else_the_authors_code_each_with_its_source():
    defaults = linear.Settings()
    assert (defaults.epochs, defaults.batch_size, defaults.lr, defaults.momentum) == (25, 120, 0.01, 0.9)  # paper
    assert defaults.block is None and linear.PAPER_BLOCK == 6  # the paper's block (authors' code: the 8th)
    assert defaults.crop_scale == (0.8, 1.0) and defaults.feature_norm == "none"  # authors' code
    assert (defaults.weight_decay, defaults.lr_batch, defaults.lr_step_epochs, defaults.lr_gamma) == (1e-4, 60, 10, 0.1)
    assert defaults.head_init_std == 0.01
    schedule, plan = defaults.recipe(world_size=1).plan(num_samples=10582, world_size=1)  # VOC trainaug
    assert schedule.lr == pytest.approx(0.02) and plan.global_batch == 120  # 0.01 x 120 / 60
    sources = linear.value_sources(linear.Settings(crop_scale=(0.5, 1.0)), linear.SOURCES)
    assert set(sources) == set(linear.SOURCES) and sources["crop_scale"] == "params"
    assert sources["lr"] == "paper Table 6" and sources["weight_decay"].startswith("authors' code")
    assert "block 8" in sources["block"]


def test_step_schedule_is_steplr_every_10_epochs():
    """StepLR(step_size=10), gamma 0.1, stepped per epoch: 25 epochs of 3 steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = linear.StepSchedule(optimizer, base_lr=0.02, every=10 * 3, gamma=0.1)
    lrs = [schedule.lr_at(step) for step in range(25 * 3)]
    assert lrs[:30] == [0.02] * 30
    assert lrs[30:60] == [pytest.approx(0.002)] * 30 and lrs[60:] == [pytest.approx(0.0002)] * 15
    schedule.step_update(31)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002)


# ------------------------------------------------------------------------------------------ probe


def test_probe_learns_a_crafted_task_and_the_encoder_stays_bitwise_frozen(encoder_dir, tmp_path, monkeypatch):
    built, build_task = [], linear.build_task

    def capture(*args, **kwargs):
        built.append(build_task(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(linear, "build_task", capture)
    data = colour_pairs(tmp_path / "pairs", {"train": 48, "val": 8})
    result = run_linear(
        encoder_dir, data, "pairs", tmp_path / "out", block=1, epochs=6, eval_every=3, lr=0.1, crop_scale=(0.5, 1.0)
    )
    metrics, run = result["metrics"], result["run"]
    assert metrics["miou"] > 80, run["evaluations"]
    assert metrics["chance_miou"] < 20
    assert set(metrics) == {"miou", "pixel_accuracy", "chance_miou", "best_epoch_miou", "best_epoch_pixel_accuracy",
                            "best_epoch"}
    assert [entry["epoch"] for entry in run["evaluations"]] == [3, 6] and run["evaluated_at"] == {"epoch": 6}
    assert run["used"]["block"] == 1 and run["used"]["optimizer"] == "SGD" and run["headline"] == {
        "miou": metrics["miou"]}
    assert set(run["per_class_iou"]) == {"black", "red", "blue"} and run["classes_scored"] == 3
    assert run["sources"]["crop_scale"] == "params" and run["sources"]["weight_decay"].startswith("authors' code")
    fresh = load_encoder(encoder_dir, img_size=64).model.state_dict()  # pos-embed resampled the same way
    frozen = built[0].features.vit.state_dict()
    assert frozen and all(torch.equal(tensor, fresh[name]) for name, tensor in frozen.items())
    assert not any(p.requires_grad for p in built[0].features.parameters())
    assert not built[0].features.training
    history = (tmp_path / "out" / "history.json").read_text()
    assert '"unit": "epoch"' in history and '"iou/2"' in history


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
    metrics = run_linear(blind, data, "pairs", tmp_path / "out", block=1, epochs=3, lr=0.1)["metrics"]
    assert metrics["miou"] <= metrics["chance_miou"] + 1e-6, metrics
    assert metrics["best_epoch_miou"] <= metrics["chance_miou"] + 1e-6


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
    assert resumed["run"]["evaluations"] == whole["run"]["evaluations"]
    assert resumed["metrics"] == whole["metrics"] and resumed["run"]["used"]["block"] == 1  # block 6 of 12 -> 1 of 2


def test_features_are_the_blocks_raw_tokens_and_the_head_starts_at_n_0_001(encoder_dir):
    encoder = load_encoder(encoder_dir, img_size=64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ((_, patches),) = load_encoder(encoder_dir, img_size=64).block_tokens(images, [1])
    torch.manual_seed(0)
    task = linear.build_task(encoder, 1, "none", num_classes=21, train_resolution=16)
    assert isinstance(task.features.vit.norm, torch.nn.Identity)  # the trained final norm is not used
    torch.testing.assert_close(task.features(images), patches.transpose(1, 2).reshape(2, 32, 8, 8))
    weight = task.model.weight
    assert abs(float(weight.detach().std()) - 0.01) < 0.002 and not task.model.bias.any()


def test_an_encoder_without_prefix_tokens_gives_its_patch_map(tmp_path):
    """timm returns bare patch tensors when `num_prefix_tokens == 0` (`class_token=False`)."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, class_token=False, global_pool="avg")
    folder = tmp_path / "gap"
    folder.mkdir()
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs).state_dict(),
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "kwargs": kwargs}))
    task = linear.build_task(load_encoder(folder, img_size=64), 1, "none", num_classes=3, train_resolution=16)
    assert task.infer(torch.randn(2, 3, 64, 64)).shape == (2, 3, 8, 8)


def test_views_are_normalised_with_the_encoders_mean_and_std(encoder_dir, tmp_path):
    """SquareEval normalises with the encoder's constants; the data module's training view (ImageNet's
    constants, in the worker) is re-normalised to them, and left untouched for an ImageNet encoder."""
    pixels = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    image, label = Image.fromarray(pixels.permute(1, 2, 0).numpy()), np.zeros((16, 16), dtype=np.int64)
    custom = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    view, _ = linear.SquareEval(16, custom)(image, label)
    expected = (pixels.float() / 255 - torch.tensor(custom.mean).view(3, 1, 1)) / torch.tensor(custom.std).view(3, 1, 1)
    torch.testing.assert_close(view, expected)

    def imagenet_view(image, label):
        return normalize(pixels), torch.as_tensor(label)

    imagenet = load_encoder(encoder_dir)
    assert EncoderNormalized.wrap(imagenet_view, imagenet) is imagenet_view
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((encoder_dir / "model.safetensors").read_bytes())
    config = json.loads((encoder_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mean": list(custom.mean), "std": list(custom.std)}))
    renormalized, _ = EncoderNormalized.wrap(imagenet_view, load_encoder(folder))(image, label)
    torch.testing.assert_close(renormalized, expected, rtol=1e-5, atol=1e-5)


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
    with pytest.raises(InputError, match="segmentation protocols read voc, ade20k or pairs layouts"):
        run_linear(encoder_dir, wrong, "imagefolder", tmp_path / "out3")
    single = colour_pairs(tmp_path / "single", {"train": 4, "val": 2})
    (single / "classes.txt").write_text("black\n")
    with pytest.raises(InputError, match=r"has 1 class \['black'\]; a classifier needs at least 2") as error:
        run_linear(encoder_dir, single, "pairs", tmp_path / "out4")
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED_DATA / "camvid.tar.gz").is_file(), reason="CamVid archive not at hand")
def test_camvid_in_the_pairs_layout(encoder_dir, tmp_path):
    with tarfile.open(SHARED_DATA / "camvid.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    root = next(path.parent for path in tmp_path.rglob("classes.txt"))
    for split in ("train", "val"):  # a few images each keep the test short
        names = sorted(path.stem for path in (root / split).iterdir())[:8]
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    result = run_linear(encoder_dir, root, "pairs", tmp_path / "out", epochs=1, batch_size=8)
    assert result["run"]["splits"]["train_images"] == 8 and len(result["run"]["classes"]) == 11
    assert 0 <= result["metrics"]["miou"] <= 100
