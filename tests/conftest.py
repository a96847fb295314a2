"""Shared fixtures. Data-layer fixtures are named `data_*`: small datasets in every on-disk layout,
generated in tmp_path, and the real CamVid / CIFAR-10 archives from ../shared when present."""

import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_image(path: Path, size: tuple[int, int] = (12, 10), seed: int = 0) -> Path:
    """A random RGB image (w, h) = size; format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _write_label(path: Path, values: np.ndarray, mode: str = "P") -> Path:
    """An index label PNG: mode P (VOC palette), L (SBD/ADE/CamVid style) or RGB (a wrong, colour label)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = Image.fromarray(values.astype(np.uint8))
    if mode == "P":
        from semanticmim.data.layouts import voc_palette

        label.putpalette(voc_palette())
    elif mode == "RGB":
        label = label.convert("RGB")
    label.save(path)
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all" * 10)
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def data_files() -> dict[str, Callable[..., Path]]:
    """Writers: image(path, size, seed), label(path, values, mode), corrupt(path), truncate(path)."""
    return {"image": _write_image, "label": _write_label, "corrupt": _corrupt, "truncate": _truncate}


@pytest.fixture
def data_imagefolder(tmp_path: Path) -> Path:
    """ROOT/{train,val}/{cat,dog,eel}/*.png; val has no `eel` folder (train's indices must still hold)."""
    root = tmp_path / "folder"
    for split, classes, count in (("train", ("dog", "cat", "eel"), 3), ("val", ("cat", "dog"), 2)):
        for c, name in enumerate(classes):
            for i in range(count):
                _write_image(root / split / name / f"{i:03d}.png", seed=10 * c + i)
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
    return root


def _label_grid(h: int, w: int, values: tuple[int, ...]) -> np.ndarray:
    """[h, w] label with horizontal bands of `values`."""
    rows = np.array(values, np.uint8)[np.arange(h) * len(values) // h]
    return np.repeat(rows[:, None], w, axis=1)


@pytest.fixture
def data_voc(tmp_path: Path) -> Path:
    """VOCdevkit/VOC2012 with ids a..d: train = a b c, val = d, trainaug = a..d (labels from
    SegmentationClassAug, mode L); labels use classes 0, 15, 20 and 255."""
    root = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    ids = ["a", "b", "c", "d"]
    for i, name in enumerate(ids):
        _write_image(root / "JPEGImages" / f"{name}.jpg", (8, 6), seed=i)
        values = _label_grid(6, 8, (0, 15, 255, 20))
        _write_label(root / "SegmentationClass" / f"{name}.png", values, "P")
        _write_label(root / "SegmentationClassAug" / f"{name}.png", np.where(values == 15, 7, values), "L")
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("a\nb\nc\n")
    (lists / "val.txt").write_text("d\n")
    (lists / "trainaug.txt").write_text("\n".join(ids) + "\n")
    return tmp_path / "voc"


@pytest.fixture
def data_ade20k(tmp_path: Path) -> Path:
    """ADEChallengeData2016 with 2 training and 1 validation image; labels use 0, 1 and 150."""
    root = tmp_path / "ade" / "ADEChallengeData2016"
    for split, names in (("training", ("ADE_train_1", "ADE_train_2")), ("validation", ("ADE_val_1",))):
        for i, name in enumerate(names):
            _write_image(root / "images" / split / f"{name}.jpg", (10, 8), seed=i)
            _write_label(root / "annotations" / split / f"{name}.png", _label_grid(8, 10, (0, 1, 150)), "L")
    return tmp_path / "ade"


@pytest.fixture
def data_pairs(tmp_path: Path) -> Path:
    """Generic pairs layout: images/ + labels/ + train.txt/val.txt, 3 classes in classes.txt."""
    root = tmp_path / "pairs"
    for i, name in enumerate(("p0", "p1", "p2")):
        _write_image(root / "images" / f"{name}.png", (9, 7), seed=i)
        _write_label(root / "labels" / f"{name}.png", _label_grid(7, 9, (0, 1, 2, 255)), "L")
    (root / "classes.txt").write_text("road\nsky\ncar\n")
    (root / "train.txt").write_text("p0\np1\n")
    (root / "val.txt").write_text("p2\n")
    return root


@pytest.fixture
def data_segnet(tmp_path: Path) -> Path:
    """CamVid/SegNet layout in miniature: {train,val}/ + {train,val}annot/, 11 classes, 11 = void."""
    root = tmp_path / "segnet"
    for split, names in (("train", ("s0", "s1")), ("val", ("s2",))):
        for i, name in enumerate(names):
            _write_image(root / split / f"{name}.jpg", (12, 9), seed=i)
            _write_label(root / f"{split}annot" / f"{name}.png", _label_grid(9, 12, (0, 10, 11)), "L")
    (root / "classes.txt").write_text("\n".join(f"class{i}" for i in range(11)) + "\n")
    return root


def _extract(archive: Path, target: Path, keep: Callable[[str], bool] = lambda name: True) -> Path:
    if not archive.is_file():
        pytest.skip(f"{archive} not present (../shared is only on developer machines)")
    with tarfile.open(archive) as tar:
        tar.extractall(target, members=[m for m in tar.getmembers() if keep(m.name)], filter="data")
    return target


@pytest.fixture(scope="session")
def data_camvid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CamVid (11 classes, 367/101/233 images), extracted once per test session."""
    return _extract(SHARED_DATA / "camvid.tar.gz", tmp_path_factory.mktemp("camvid")) / "camvid"


@pytest.fixture(scope="session")
def data_cifar_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CIFAR-10 test split as JPEG ImageFolder (`test/<class>/NNNN.jpg`): the first 20 images of
    each class (writing all 10k files takes longer than the tests that use them)."""
    first_twenty = lambda name: not name.endswith(".jpg") or int(Path(name).stem) < 20  # noqa: E731
    return _extract(SHARED_DATA / "cifar10" / "test.tar.gz", tmp_path_factory.mktemp("cifar"), first_twenty)
