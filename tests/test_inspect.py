"""`inspect_dataset`, `write_manifest` and the `semanticmim data inspect|prepare` commands."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from semanticmim.data.inspect import inspect_dataset, write_manifest
from semanticmim.errors import InputError
from stages.cli import app

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def test_inspect_counts_sizes_and_skips_corrupt_files(data_imagefolder: Path, data_files):
    data_files["corrupt"](data_imagefolder / "train" / "dog" / "000.png")
    data_files["truncate"](data_files["image"](data_imagefolder / "val" / "cat" / "big.jpg", (40, 30)))
    data_files["image"](data_imagefolder / "val" / "cat" / "wide.png", (50, 10))
    seen: list[int] = []
    report = inspect_dataset(data_imagefolder, "imagefolder", workers=3, progress=seen.append)
    assert report.usable and report.images == 8 + 5 and sum(seen) == 9 + 6
    assert report.splits == {"train": {"listed": 9, "images": 8, "skipped": 1},
                             "val": {"listed": 6, "images": 5, "skipped": 1}}  # fmt: skip
    assert report.classes == ["cat", "dog", "eel"]
    assert report.image_size == {"min": [12, 10], "max": [50, 10], "mean": [14.9, 10.0], "most_common": [12, 10]}
    assert sorted(Path(entry["path"]).name for entry in report.skipped) == ["000.png", "big.jpg"]
    assert all(entry["reason"] for entry in report.skipped)


def test_inspect_reports_bad_labels_as_problems(data_voc: Path, data_files):
    labels = data_voc / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    data_files["label"](labels / "c.png", np.full((6, 8), 42), "P")
    data_files["label"](labels / "d.png", np.zeros((5, 8)), "P")
    report = inspect_dataset(data_voc, "voc", splits=["train", "val"])
    assert not report.usable and report.images == 4  # the images themselves are readable
    assert len(report.problems) == 2
    assert "c.png: label value(s) [42] outside" in report.problems[0]
    assert "d.png: label is 8x5, image 8x6" in report.problems[1]


def test_inspect_segmentation_formats(data_ade20k: Path, data_pairs: Path, data_segnet: Path):
    ade = inspect_dataset(data_ade20k, "ade20k")
    assert ade.usable and ade.images == 3 and len(ade.classes) == 150
    pairs = inspect_dataset(data_pairs, "pairs")
    assert pairs.usable and pairs.splits["val"]["images"] == 1 and pairs.classes == ["road", "sky", "car"]
    segnet = inspect_dataset(data_segnet, "pairs")  # 11 = void is not a problem
    assert segnet.usable and segnet.images == 3
    strict = inspect_dataset(data_segnet, "pairs", void_label=255)  # ... unless the void value is another one
    assert not strict.usable and "label value(s) [11]" in strict.problems[0]


def test_cli_inspect_json_and_exit_codes(data_imagefolder: Path, data_files, tmp_path: Path):
    data_files["corrupt"](data_imagefolder / "val" / "dog" / "000.png")
    result = _invoke("data", "inspect", "--format", "imagefolder", data_imagefolder, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["images"], report["classes"]) == (12, 3)
    assert [Path(entry["path"]).name for entry in report["skipped"]] == ["000.png"]

    table = _invoke("data", "inspect", data_imagefolder)
    assert table.exit_code == 0 and "classes: 3 (cat, dog, eel)" in table.stdout and "skipped:" in table.stdout

    missing = _invoke("data", "inspect", "--format", "voc", tmp_path / "nope")
    assert missing.exit_code == 2
    assert missing.stderr.strip().count("\n") == 0 and "expected a voc layout" in missing.stderr


def test_cli_inspect_unusable_dataset_exits_1_with_one_line(data_voc: Path, data_files):
    data_files["label"](data_voc / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "a.png", np.full((6, 8), 99), "P")
    result = _invoke("data", "inspect", "--format", "voc", data_voc, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["usable"] is False
    assert result.stderr.count("\n") == 1 and "a.png: label value(s) [99]" in result.stderr


def test_cli_prepare_embedded_then_inspect_it(tmp_path: Path):
    out = tmp_path / "embedded"
    result = _invoke("data", "prepare", "embedded", "--out", out, "--image-size", 24, "--train", 20, "--val", 10,
                     "--workers", 1)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "meta.json").read_text())["splits"] == {"train": 20, "val": 10}
    classification = json.loads(_invoke("data", "inspect", out / "classification", "--json").stdout)
    assert (classification["images"], classification["classes"], classification["skipped"]) == (30, 10, [])
    segmentation = _invoke("data", "inspect", "--format", "voc", out / "segmentation", "--json")
    assert segmentation.exit_code == 0
    assert (json.loads(segmentation.stdout)["images"], json.loads(segmentation.stdout)["classes"]) == (30, 16)


def test_cli_void_label_only_for_pairs(data_imagefolder: Path):
    result = _invoke("data", "inspect", data_imagefolder, "--void-label", 11)
    assert result.exit_code == 2 and "--void-label applies to --format pairs only" in result.stderr


def test_cli_prepare_argument_errors(tmp_path: Path):
    assert _invoke("data", "prepare", "embedded", tmp_path, "--out", tmp_path / "e").exit_code == 2
    result = _invoke("data", "prepare", "voc", "--out", tmp_path / "m.json")
    assert result.exit_code == 2 and "needs the dataset ROOT" in result.stderr


def test_manifest_is_stable_and_changes_with_the_data(data_voc: Path, tmp_path: Path):
    out = tmp_path / "dvc" / "voc.manifest.json"
    result = _invoke("data", "prepare", "voc", data_voc, "--out", out)
    assert result.exit_code == 0, result.output
    first = out.read_bytes()
    manifest = json.loads(first)
    assert manifest["splits"] == {"train": {"samples": 3}, "trainaug": {"samples": 4}, "val": {"samples": 1}}
    assert manifest["files"] == 4 + 4 + 4 and len(manifest["classes"]) == 21
    assert manifest["fingerprint"].startswith("sha256:")
    write_manifest(data_voc, "voc", out)
    assert out.read_bytes() == first  # nothing changed: same bytes, DVC reruns nothing
    assert sorted(p.name for p in out.parent.iterdir()) == ["voc.manifest.json"]  # no temp file left

    image = data_voc / "VOCdevkit" / "VOC2012" / "JPEGImages" / "b.jpg"
    stat = image.stat()
    os.utime(image, (stat.st_atime, stat.st_mtime + 5))  # same size, edited in place
    assert write_manifest(data_voc, "voc", out)["fingerprint"] != manifest["fingerprint"]


def test_manifest_counts_follow_the_split_lists(data_pairs: Path, data_files, tmp_path: Path):
    before = write_manifest(data_pairs, "pairs", tmp_path / "m.json", splits=["train"])
    data_files["image"](data_pairs / "images" / "p3.png", (9, 7))
    data_files["label"](data_pairs / "labels" / "p3.png", np.zeros((7, 9)), "L")
    unlisted = write_manifest(data_pairs, "pairs", tmp_path / "m.json", splits=["train"])
    assert unlisted["fingerprint"] == before["fingerprint"]  # files no split uses do not count
    (data_pairs / "train.txt").write_text("p0\np1\np3\n")
    after = write_manifest(data_pairs, "pairs", tmp_path / "m.json", splits=["train"])
    assert (before["splits"]["train"]["samples"], after["splits"]["train"]["samples"]) == (2, 3)
    assert after["fingerprint"] != before["fingerprint"]
    with pytest.raises(InputError, match="unknown dataset layout"):
        write_manifest(data_pairs, "lmdb", tmp_path / "m.json")


def test_real_camvid_inspect(data_camvid: Path):
    result = _invoke("data", "inspect", "--format", "pairs", data_camvid, "--json", "--workers", 4)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["images"], report["classes"], report["skipped"]) == (701, 11, [])
    assert report["image_size"]["most_common"] == [240, 180]
