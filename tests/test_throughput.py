import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semanticmim.data.decode import EncodedImage
from semanticmim.data.transforms import normalize
from semanticmim.errors import InputError
from stages.bench.data import PIPELINES, collect_images, measure_pipelines

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.tar.gz"


def _jpegs(folder: Path, count: int = 6) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (72 + i, 96, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _assert_records(records, pipelines, max_images):
    assert [(r["pipeline"], r["source"]) for r in records] == pipelines
    for record in records:
        assert set(record) - {"vs_reference"} == {
            "pipeline",
            "source",
            "img_size",
            "images",
            "seconds",
            "wall_seconds",
            "img_per_s_per_core",
            "bits_per_pixel",
            "skipped_files",
        }
        assert 1 <= record["images"] <= max_images
        assert record["seconds"] > 0 and record["wall_seconds"] > 0
        assert record["img_per_s_per_core"] == pytest.approx(record["images"] / record["seconds"], rel=1e-2)
        assert record["bits_per_pixel"] > 0


def test_every_pipeline_measured(tmp_path):
    records, _ = measure_pipelines(_jpegs(tmp_path / "images"), img_size=32, seconds=0.3, max_images=4)
    expected = [(name, "folder") for name in PIPELINES] + [("maskfeat", "shards")]
    _assert_records(records, expected, max_images=4)
    paths = _jpegs(tmp_path / "images")
    bits = 8 * sum(path.stat().st_size for path in paths) / sum(96 * (72 + i) for i in range(len(paths)))
    assert records[0]["bits_per_pixel"] == pytest.approx(bits, abs=1e-3)
    reference = next(r for r in records if r["pipeline"] == "maskfeat-reference")["img_per_s_per_core"]
    ratios = {r["source"]: r["vs_reference"] for r in records if r["pipeline"] == "maskfeat"}
    assert set(ratios) == {"folder", "shards"}
    for record in records:
        if record["pipeline"] == "maskfeat":
            assert record["vs_reference"] == pytest.approx(record["img_per_s_per_core"] / reference, abs=1e-3)
        else:
            assert "vs_reference" not in record


def test_reference_pipeline_matches_ours_in_distribution(tmp_path):
    """Same crop-scale law and normalisation: over many draws the mean images agree closely."""
    y, x = np.mgrid[0:75, 0:100]
    ramps = np.stack([x * 255 / 99, y * 255 / 74, np.full_like(x, 128.0)], -1).astype(np.uint8)
    Image.fromarray(ramps).save(tmp_path / "ramps.jpg", quality=95)
    image = EncodedImage.from_file(tmp_path / "ramps.jpg")
    ours, reference = PIPELINES["maskfeat"](32), PIPELINES["maskfeat-reference"](32)
    torch.manual_seed(0)
    mean_ours = torch.stack([normalize(ours(image)) for _ in range(300)]).mean(0)
    mean_reference = torch.stack([reference(image) for _ in range(300)]).mean(0)
    assert reference(image).dtype == torch.float32
    assert (mean_ours - mean_reference).abs().mean() < 0.05


def test_unreadable_files_are_left_out(tmp_path):
    paths = _jpegs(tmp_path / "images", count=2)
    (tmp_path / "images" / "bad.jpg").write_bytes(b"junk")
    records, skipped = measure_pipelines(
        [*paths, tmp_path / "images" / "bad.jpg"], 32, seconds=0.2, max_images=3, pipelines=["maskfeat"], shards=()
    )
    _assert_records(records, [("maskfeat", "folder")], max_images=3)
    assert skipped == [str(tmp_path / "images" / "bad.jpg")] and records[0]["skipped_files"] == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="'nope'"):
        measure_pipelines(_jpegs(tmp_path / "images", 1), pipelines=["nope"])
    with pytest.raises(InputError, match="at least one"):
        measure_pipelines([])
    (tmp_path / "junk.jpg").write_bytes(b"junk")
    with pytest.raises(InputError, match="none of the 1 files"):
        measure_pipelines([tmp_path / "junk.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files"):
        collect_images(tmp_path / "empty")
    with pytest.raises(InputError, match="not a directory"):
        collect_images(tmp_path / "absent")


def test_collect_images(tmp_path):
    _jpegs(tmp_path / "a" / "b", 3)
    (tmp_path / "a" / "notes.txt").write_text("x")
    found = collect_images(tmp_path, limit=2)
    assert [path.name for path in found] == ["0.jpg", "1.jpg"]


@pytest.mark.skipif(not CIFAR_TEST.is_file(), reason=f"{CIFAR_TEST} not present")
def test_on_cifar_jpegs(tmp_path):
    with tarfile.open(CIFAR_TEST) as archive:
        members = []
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg"):
                members.append(member)
            if len(members) == 8:
                break
        archive.extractall(tmp_path, members=members, filter="data")
    samples = collect_images(tmp_path)
    assert len(samples) == 8
    records, _ = measure_pipelines(samples, img_size=32, seconds=0.2, max_images=5, pipelines=["maskfeat", "linear"])
    _assert_records(records, [("maskfeat", "folder"), ("linear", "folder"), ("maskfeat", "shards")], max_images=5)
