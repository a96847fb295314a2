"""Profiles as experiments: within each Table 1 pair the recipes differ only where the paper says (K and the
mask ratio), every departure from the paper is stated, and a real ImageFolder replaces the embedded
classification set with one override (`data.classification`)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from support import PROFILES, REPO

from semanticmim.data.layouts import read_imagefolder
from semanticmim.data.linked import balanced_subset, link_imagefolder
from semanticmim.errors import InputError
from semanticmim.methods.registry import check_tokenizer_grid
from semanticmim.targets.dalle import DalleTokenizerConfig
from stages import prepare
from stages.params import load_section

PAIRS = (("beit", "beit-semanticmim"), ("maskfeat", "maskfeat-semanticmim"))
CIFAR = REPO.parent / "shared" / "data" / "cifar10"


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0])
def test_within_a_pair_the_recipes_differ_only_in_k_and_the_mask_ratio(profile, pair):
    pretrain = load_section(profile, "pretrain")
    baseline, semantic = (asdict(pretrain.resolve(name)) for name in pair)
    differ = {key for key in baseline if baseline[key] != semantic[key]}
    assert differ <= {"num_proxy", "mask_ratio"}, (profile.name, pair, differ)
    assert semantic["num_proxy"] > baseline["num_proxy"] == 1


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_the_tokenizer_grid_is_the_patch_grid(profile):
    """BEiT's targets: the dVAE sees the half-size view, so its tokens must tile the model's patches; a
    profile that breaks this used to fail only at the first pretraining step, after the dVAE had trained."""
    document = yaml.safe_load(profile.read_text())
    dvae, model = document["dvae"], document["pretrain"]["model"]
    check_tokenizer_grid(DalleTokenizerConfig(group_count=dvae["group_count"]).downsample, model["patch_size"])
    assert 2 * dvae["image_size"] == model["img_size"], "the dVAE trains on the tokenizer's view size"


def test_a_tokenizer_of_another_grid_is_refused_before_training():
    with pytest.raises(InputError, match=r"a token covers 8 px, but the patch size is 4: tokenizer grid and patch"):
        check_tokenizer_grid(DalleTokenizerConfig(group_count=3).downsample, 4)
    check_tokenizer_grid(DalleTokenizerConfig(group_count=4).downsample, 16)  # OpenAI's DALL-E with ViT-B/16


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.name in ("params.yaml", "mini.yaml")],
                         ids=lambda p: p.name)
def test_a_laptop_profile_lists_each_departure_with_the_paper_value_and_a_reason(profile):
    departures = yaml.safe_load(profile.read_text())["report"]["departures"]
    assert len(departures) >= 4
    for departure in departures:
        assert set(departure) == {"value", "paper", "reason"} and all(str(v).strip() for v in departure.values())
    stated = " ".join(d["value"] for d in departures)
    document = yaml.safe_load(profile.read_text())
    assert f"{document['pretrain']['recipe']['epochs']} epochs" in stated  # the schedule is among them


def folder(root: Path, split: str, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        (root / split / name).mkdir(parents=True)
        for i in range(count):
            (root / split / name / f"{i:04d}.png").write_bytes(b"not decoded here")


def test_balanced_subset_takes_classes_in_turn_and_is_seeded():
    samples = [(f"a{i}", 0) for i in range(10)] + [(f"b{i}", 1) for i in range(3)]
    chosen = balanced_subset(samples, 6, seed=1)
    assert sorted(label for _, label in chosen) == [0, 0, 0, 1, 1, 1]
    assert chosen == balanced_subset(samples, 6, seed=1) and chosen != balanced_subset(samples, 6, seed=2)
    assert len(balanced_subset(samples, 100, seed=0)) == 13
    with pytest.raises(InputError, match="count=0"):
        balanced_subset(samples, 0, seed=0)


def test_link_imagefolder_links_a_subset_of_each_split_under_new_names(tmp_path):
    source = tmp_path / "src"
    folder(source, "train", {"cat": 5, "dog": 5})
    folder(source, "test", {"cat": 2, "dog": 2})
    linked = link_imagefolder(source, tmp_path / "out", {"train": ("train", 4), "val": ("test", 10)}, seed=0)
    assert linked == {"train": 4, "val": 4}
    links = sorted((tmp_path / "out").rglob("*.png"))
    assert len(links) == 8 and all(p.is_symlink() and p.resolve().is_relative_to(source.resolve()) for p in links)
    assert read_imagefolder(tmp_path / "out", "val").classes == ("cat", "dog")
    with pytest.raises(InputError, match="exists and is not empty"):
        link_imagefolder(source, tmp_path / "out", {"train": ("train", 4)}, seed=0)


def write_profile(tmp_path: Path, classification: str | None, kind: str = "embedded") -> Path:
    document = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    document["data"].update({"out": str(tmp_path / "data"), "classification": classification, "kind": kind})
    if kind != "embedded":
        document["data"]["root"] = str(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_prepare_links_an_imagefolder_in_place_of_the_embedded_classification_set(tmp_path):
    source = tmp_path / "cifar"
    folder(source, "train", {"cat": 40, "dog": 40})
    folder(source, "test", {"cat": 20, "dog": 20})
    message = prepare.run(write_profile(tmp_path, str(source)))
    assert "links to 64 train + 32 test images" in message
    train = read_imagefolder(tmp_path / "data" / "classification", "train")
    assert train.classes == ("cat", "dog") and len(train.samples) == 64
    assert (tmp_path / "data" / "segmentation").is_dir()  # segmentation stays embedded


@pytest.mark.parametrize("classification, kind, message", [
    ("missing-folder", "embedded", "data.classification: "),
    ("x", "imagefolder", "classification: replaces the embedded classification set"),
])
def test_a_bad_classification_override_is_one_line(tmp_path, classification, kind, message):
    with pytest.raises(InputError) as error:
        prepare.run(write_profile(tmp_path, str(tmp_path / classification), kind))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.skipif(not (CIFAR / "test.tar.gz").is_file(), reason="../shared/data/cifar10 not present")
def test_real_cifar10_replaces_the_classification_set(tmp_path):
    import tarfile

    source = tmp_path / "cifar10"
    with tarfile.open(CIFAR / "test.tar.gz") as archive:  # the test split as both splits: enough for links
        members = [m for m in archive.getmembers() if m.isfile() and int(Path(m.name).stem) < 30]
        archive.extractall(source, members=members, filter="data")
    os.symlink(source / "test", source / "train")
    prepare.run(write_profile(tmp_path, str(source)))
    train = read_imagefolder(tmp_path / "data" / "classification", "train")
    assert len(train.classes) == 10 and len(train.samples) == 64
    assert {label for _, label in train.samples} == set(range(10))  # balanced: every class present
