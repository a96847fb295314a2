"""Layout readers and torch Datasets: every on-disk layout, label conventions, and faults (the engineering bar)."""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import semanticmim.data
from semanticmim.data.layouts import (
    ClassificationDataset,
    LabelMap,
    SegmentationDataset,
    available_splits,
    image_to_tensor,
    read_ade20k,
    read_imagefolder,
    read_imagenet,
    read_label,
    read_pairs,
    read_split,
    read_voc,
)
from semanticmim.errors import InputError

# ------------------------------------------------------------------------------------ classification


def test_imagefolder_classes_sorted_and_shared_by_splits(data_imagefolder: Path):
    train = read_imagefolder(data_imagefolder, "train")
    val = read_imagefolder(data_imagefolder, "val")
    assert train.classes == val.classes == ("cat", "dog", "eel")
    assert len(train.samples) == 9 and len(val.samples) == 4  # notes.txt is not an image
    # val has no eel folder: indices still come from train's class list
    assert {Path(path).parent.name: label for path, label in val.samples} == {"cat": 0, "dog": 1}
    assert train.samples == sorted(train.samples, key=lambda sample: (sample[1], sample[0]))


def test_imagefolder_unknown_class_and_bad_roots(data_imagefolder: Path, data_files, tmp_path: Path):
    data_files["image"](data_imagefolder / "val" / "fox" / "0.png")
    with pytest.raises(InputError, match=r"fox: class folder not in the class list"):
        read_imagefolder(data_imagefolder, "val")
    with pytest.raises(InputError, match=r"no such folder; expected .*<split>/<class>") as error:
        read_imagefolder(tmp_path / "missing", "train")
    assert "\n" not in str(error.value)
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(InputError, match="no images found"):
        read_imagefolder(tmp_path / "empty", "train")


def test_imagenet_class_index_is_written_once_and_then_fixes_the_order(data_imagefolder: Path, tmp_path: Path):
    index_file = tmp_path / "meta" / "class_index.json"
    first = read_imagenet(data_imagefolder, "train", class_index=index_file)
    assert json.loads(index_file.read_text()) == {"cat": 0, "dog": 1, "eel": 2}
    index_file.write_text(json.dumps({"eel": 0, "dog": 1, "cat": 2}))  # a frozen, different order wins
    second = read_imagenet(data_imagefolder, "val", class_index=index_file)
    assert second.classes == ("eel", "dog", "cat")
    assert {Path(p).parent.name: label for p, label in second.samples} == {"dog": 1, "cat": 2}
    assert first.classes == ("cat", "dog", "eel")
    with pytest.raises(InputError, match=r"not an ImageNet root; expected ROOT/\{train,val\}/<wnid>"):
        read_imagenet(tmp_path / "nowhere", "val")


def test_classification_dataset_yields_tensor_and_label(data_imagefolder: Path):
    dataset = ClassificationDataset(read_imagefolder(data_imagefolder, "val"))
    image, label = dataset[3]
    assert image.dtype == torch.float32 and image.shape == (3, 10, 12)
    expected = np.asarray(Image.open(dataset.split.samples[3][0]).convert("RGB"), np.float32) / 255
    torch.testing.assert_close(image, torch.from_numpy(expected).permute(2, 0, 1))
    assert label == 1 and dataset.targets == [0, 0, 1, 1] and dataset.classes == ("cat", "dog", "eel")
    assert ClassificationDataset(dataset.split, transform=lambda img: img.size)[0] == ((12, 10), 0)


# ----------------------------------------------------------------------------------------- faults


def test_unreadable_images_are_substituted_and_reported(data_imagefolder: Path, data_files, tmp_path: Path):
    cat = data_imagefolder / "train" / "cat"
    data_files["corrupt"](cat / "000.png")
    data_files["truncate"](data_files["image"](cat / "001.jpg", (64, 64)))
    (cat / "001.png").unlink()  # so that 001.jpg takes its place in the sorted order
    report = tmp_path / "skipped.jsonl"
    dataset = ClassificationDataset(read_imagefolder(data_imagefolder, "train"), transform=lambda i: i.size,
                                    skip_report=report)  # fmt: skip
    assert [Path(p).name for p in dataset.split.image_paths[:3]] == ["000.png", "001.jpg", "002.png"]
    # index 0 and 1 are unreadable: both become the next readable sample (index 2, cat)
    assert dataset[0] == dataset[1] == dataset[2] == ((12, 10), 0)
    skipped = dataset.skipped
    assert [Path(entry["path"]).name for entry in skipped] == ["000.png", "001.jpg"]
    assert all(entry["reason"] and "\n" not in entry["reason"] for entry in skipped)
    assert len(report.read_text().splitlines()) == 2  # recorded once, even when met again
    dataset[0]
    assert len(report.read_text().splitlines()) == 2


def test_skips_in_dataloader_workers_reach_the_parent(data_imagefolder: Path, data_files, tmp_path: Path):
    data_files["corrupt"](data_imagefolder / "val" / "dog" / "001.png")
    dataset = ClassificationDataset(read_imagefolder(data_imagefolder, "val"), skip_report=tmp_path / "skip.jsonl")
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert sum(len(labels) for _, labels in batches) == 4  # fixed epoch length and batch shapes
    assert all(images.shape == (2, 3, 10, 12) for images, _ in batches)
    assert [Path(entry["path"]).name for entry in dataset.skipped] == ["001.png"]


def test_lazy_decode_hands_encoded_images_and_still_skips_truncated(data_imagefolder: Path, data_files):
    data_files["truncate"](data_files["image"](data_imagefolder / "val" / "cat" / "a.jpg", (64, 48)))
    seen = []

    def transform(source):
        seen.append(type(source).__name__)
        return image_to_tensor(source)  # decodes here: truncation surfaces inside the transform

    dataset = ClassificationDataset(read_imagefolder(data_imagefolder, "val"), transform, lazy_decode=True)
    image, label = dataset[2]  # a.jpg → substituted by the next sample, the first dog
    assert (image.shape, label) == ((3, 10, 12), 1) and set(seen) == {"EncodedImage"}
    assert [Path(entry["path"]).name for entry in dataset.skipped] == ["a.jpg"]


def test_all_images_unreadable_is_one_input_error(data_files, tmp_path: Path):
    for i in range(2):
        data_files["corrupt"](tmp_path / "bad" / "train" / "x" / f"{i}.jpg")
    dataset = ClassificationDataset(read_imagefolder(tmp_path / "bad", "train"))
    with pytest.raises(InputError, match="none of the 2 train images could be read"):
        dataset[1]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "I;16", "P"])
def test_other_image_modes_become_rgb(mode: str, tmp_path: Path):
    path = tmp_path / "modes" / "train" / "a" / ("x.tif" if mode == "CMYK" else "x.png")
    path.parent.mkdir(parents=True)
    if mode == "I;16":
        Image.fromarray(np.full((5, 7), 65535, np.uint16)).save(path)
    else:
        Image.new("RGB", (7, 5), (200, 100, 50)).convert(mode).save(path)
    image, _ = ClassificationDataset(read_imagefolder(tmp_path / "modes", "train"))[0]
    assert image.shape == (3, 5, 7)


# --------------------------------------------------------------------------------------- segmentation


def test_voc_reads_palette_indices_and_trainaug_from_aug_folder(data_voc: Path):
    train = read_voc(data_voc, "train")  # VOCdevkit/VOC2012 is found below the given root
    assert len(train.samples) == 3 and len(train.classes) == 21
    image, label = SegmentationDataset(train)[0]
    assert image.shape == (3, 6, 8) and label.dtype == torch.int64 and label.shape == (6, 8)
    assert label[:, 0].tolist() == [0, 0, 15, 255, 255, 20]  # indices, not palette colours
    assert Image.open(train.samples[0][1]).mode == "P"
    aug = read_voc(data_voc, "trainaug")
    assert "SegmentationClassAug" in aug.samples[0][1] and len(aug.samples) == 4
    assert set(SegmentationDataset(aug)[3][1].unique().tolist()) == {0, 7, 20, 255}
    assert available_splits("voc", data_voc) == ["train", "trainaug", "val"]


def test_voc_layout_errors_are_one_line(data_voc: Path, data_files, tmp_path: Path):
    root = data_voc / "VOCdevkit" / "VOC2012"
    with pytest.raises(InputError, match=r"no JPEGImages/ folder; expected a voc layout"):
        read_voc(tmp_path, "train")
    with pytest.raises(InputError, match=r"test.txt: split list not found"):
        read_voc(data_voc, "test")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("d\nzz\n")
    with pytest.raises(InputError, match=r"1 file\(s\) listed in .*val.txt are missing \(first: 'zz'\)"):
        read_voc(data_voc, "val")


def test_label_outside_class_range_names_the_file(data_voc: Path, data_files):
    label_path = data_voc / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "b.png"
    data_files["label"](label_path, np.full((6, 8), 21, np.uint8), "P")
    dataset = SegmentationDataset(read_voc(data_voc, "train"))
    with pytest.raises(InputError, match=r"b.png: label value\(s\) \[21\] outside .*classes 0..20") as error:
        dataset[1]
    assert "\n" not in str(error.value)


def test_colour_label_and_size_mismatch_are_input_errors(data_voc: Path, data_files):
    labels = data_voc / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    data_files["label"](labels / "a.png", np.zeros((6, 8), np.uint8), "RGB")
    data_files["label"](labels / "b.png", np.zeros((3, 8), np.uint8), "P")
    dataset = SegmentationDataset(read_voc(data_voc, "train"))
    with pytest.raises(InputError, match=r"a.png: label is a RGB image; expected an index PNG"):
        dataset[0]
    with pytest.raises(InputError, match=r"b.png: label is 8x3 but its image .*b.jpg is 8x6"):
        dataset[1]


def test_unreadable_label_is_skipped_like_an_image(data_voc: Path, data_files):
    data_files["corrupt"](data_voc / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "a.png")
    dataset = SegmentationDataset(read_voc(data_voc, "train"), joint_transform=lambda image, label: label.shape)
    assert dataset[0] == (6, 8)
    assert [Path(entry["path"]).name for entry in dataset.skipped] == ["a.png"]


def test_ade20k_reduces_zero_label(data_ade20k: Path):
    split = read_ade20k(data_ade20k, "train")  # alias of "training"
    assert len(split.samples) == 2 and len(split.classes) == 150 and split.classes[0] == "wall"
    _, label = SegmentationDataset(split)[0]
    assert label[:, 0].tolist() == [255, 255, 255, 0, 0, 0, 149, 149]
    assert available_splits("ade20k", data_ade20k) == ["training", "validation"]
    with pytest.raises(InputError, match=r"\[151\] outside .*classes 1..150, 255 = ignore, 0 = ignore"):
        LabelMap(150, reduce_zero=True).apply(np.array([[151]], np.uint8), "x.png")


def test_pairs_layout_with_split_lists(data_pairs: Path, tmp_path: Path):
    train = read_split("pairs", data_pairs, "train")
    assert train.classes == ("road", "sky", "car") and [Path(p).stem for p, _ in train.samples] == ["p0", "p1"]
    assert set(SegmentationDataset(train)[0][1].unique().tolist()) == {0, 1, 2, 255}
    assert available_splits("pairs", data_pairs) == ["train", "val"]
    (tmp_path / "no_classes" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match=r"classes.txt: not found"):
        read_pairs(tmp_path / "no_classes", "train")


def test_segnet_layout_maps_void_to_ignore(data_segnet: Path, data_files):
    split = read_pairs(data_segnet, "train")
    _, label = SegmentationDataset(split)[1]
    assert label[:, 0].tolist() == [0, 0, 0, 10, 10, 10, 255, 255, 255]
    data_files["label"](data_segnet / "trainannot" / "s0.png", np.full((9, 12), 12, np.uint8), "L")
    with pytest.raises(InputError, match=r"s0.png: label value\(s\) \[12\] outside .*11 = void"):
        SegmentationDataset(split)[0]
    assert read_label(data_segnet / "valannot" / "s2.png").dtype == np.uint8


def test_unknown_format_is_one_line():
    with pytest.raises(InputError, match="unknown dataset layout 'coco'; expected one of imagefolder"):
        read_split("coco", ".", "train")


# ------------------------------------------------------------------------------------- real archives


def test_real_camvid(data_camvid: Path):
    splits = {name: read_pairs(data_camvid, name) for name in available_splits("pairs", data_camvid)}
    assert {name: len(split.samples) for name, split in splits.items()} == {"train": 367, "val": 101, "test": 233}
    assert splits["train"].classes[:3] == ("sky", "building", "pole") and len(splits["train"].classes) == 11
    dataset = SegmentationDataset(splits["val"])
    image, label = dataset[0]
    assert image.shape == (3, 180, 240) and label.shape == (180, 240)
    raw = read_label(splits["val"].samples[0][1])
    assert set(label.unique().tolist()) <= set(range(11)) | {255}
    assert torch.equal(label == 255, torch.from_numpy(raw == 11))


def test_real_cifar10_test_split(data_cifar_test: Path):
    assert available_splits("imagefolder", data_cifar_test) == ["test"]
    split = read_imagefolder(data_cifar_test, "test")
    assert len(split.samples) == 200 and split.classes[0] == "airplane" and len(split.classes) == 10
    image, label = ClassificationDataset(split)[199]
    assert image.shape == (3, 32, 32) and label == 9 and split.classes[9] == "truck"


# ------------------------------------------------------------------------------------------- package


def test_package_reexports_every_public_name_lazily():
    for module_name in ("decode", "layouts", "embedded", "inspect", "transforms", "loader", "shards"):
        module = importlib.import_module(f"semanticmim.data.{module_name}")
        for name in module.__all__:
            if name == "IGNORE_INDEX" and module_name != "layouts":
                continue  # one name, one value: the layouts constant is the exported one
            assert getattr(semanticmim.data, name) is getattr(module, name), f"{module_name}.{name}"
    assert semanticmim.data.IGNORE_INDEX == 255
    with pytest.raises(AttributeError):
        semanticmim.data.no_such_name  # noqa: B018
