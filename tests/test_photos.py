"""`write_photo_jpegs` and `semanticmim bench --sample-photos`: ImageNet-sized JPEGs with no download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semanticmim.data.decode import EncodedImage
from semanticmim.errors import InputError
from stages.bench.photos import write_photo_jpegs
from stages.cli import app

runner = CliRunner()


def _contents(paths):
    return [path.read_bytes() for path in paths]


def test_jpegs_have_the_exact_size_and_decode(tmp_path):
    paths = write_photo_jpegs(tmp_path / "photos", count=3)
    assert [path.name for path in paths] == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert sorted(path.name for path in (tmp_path / "photos").iterdir()) == [path.name for path in paths]
    for path in paths:
        pixels, reduction = EncodedImage.from_file(path).decode_tensor()
        assert reduction == 1 and pixels.dtype == torch.uint8 and pixels.shape == (3, 375, 500)
    small = write_photo_jpegs(tmp_path / "small", count=2, size=(64, 40), quality=75)
    assert all(EncodedImage.from_file(path).decode_tensor()[0].shape == (3, 40, 64) for path in small)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = write_photo_jpegs(tmp_path / "a", count=4, size=(96, 72), seed=3)
    again = write_photo_jpegs(tmp_path / "b", count=4, size=(96, 72), seed=3)
    other = write_photo_jpegs(tmp_path / "c", count=4, size=(96, 72), seed=4)
    assert _contents(first) == _contents(again)
    assert _contents(first) != _contents(other)
    # image i does not depend on how many are written
    assert _contents(write_photo_jpegs(tmp_path / "d", count=2, size=(96, 72), seed=3)) == _contents(first)[:2]


def test_images_differ_from_each_other(tmp_path):
    paths = write_photo_jpegs(tmp_path, count=6, size=(96, 72))
    pixels = [EncodedImage.from_file(path).decode_tensor()[0].float() for path in paths]
    for i in range(len(pixels)):
        for j in range(i + 1, len(pixels)):
            assert (pixels[i] - pixels[j]).abs().mean() > 1, (i, j)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"count": 0}, "count"),
        ({"size": (0, 10)}, "size"),
        ({"size": (10, -1)}, "size"),
        ({"quality": 0}, "quality"),
        ({"quality": 101}, "quality"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, arguments, name):
    with pytest.raises(InputError, match=f"^{name}:") as error:
        write_photo_jpegs(tmp_path / "out", **arguments)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_folder_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"^folder:"):
        write_photo_jpegs(tmp_path / "file", count=1)


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def half_written(image, target, *args, **kwargs):
        Path(target).write_bytes(b"\xff\xd8 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_written)
    with pytest.raises(KeyboardInterrupt):
        write_photo_jpegs(tmp_path, count=2, size=(32, 24))
    assert list(tmp_path.iterdir()) == []


def test_bench_sample_photos_measures_the_pipelines():
    result = runner.invoke(app, ["bench", "--sample-photos", "3", "--img-size", "32", "--seconds", "0.05", "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    maskfeat = [r for r in records if r["pipeline"] == "maskfeat" and r["source"] == "folder"]
    assert len(maskfeat) == 1 and maskfeat[0]["img_per_s_per_core"] > 0
    assert all(r["img_size"] == 32 and r["images"] > 0 and r["img_per_s_per_core"] > 0 for r in records)
    both = runner.invoke(app, ["bench", "--sample-photos", "3", "--data", "."])
    assert both.exit_code == 2 and len(both.output.strip().splitlines()) == 1
    assert "--data" in both.output and "--sample-photos" in both.output
    none = runner.invoke(app, ["bench", "--sample-photos", "0"])
    assert none.exit_code == 2 and "--sample-photos" in none.output and len(none.output.strip().splitlines()) == 1
