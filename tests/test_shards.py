"""Shard writing/reading and the DataLoader builder (both are the loading path)."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset

import semanticmim.data.shards as shards_module
from semanticmim.data.decode import EncodedImage
from semanticmim.data.loader import build_loader, set_epoch
from semanticmim.data.shards import INDEX_NAME, ShardDataset, write_shards
from semanticmim.data.transforms import maskfeat_transform
from semanticmim.errors import InputError


def _label_of(index: int) -> int:
    return index * 7 % 5


def _make_images(folder, count=25):
    """Image i is a flat gray encoding i (level 10·i: JPEG keeps flat grays exact); sizes vary around
    and above max_side 64."""
    folder.mkdir(exist_ok=True)
    samples = []
    for i in range(count):
        size = (40 + 13 * i, 30 + 7 * i) if i % 2 else (30 + 5 * i, 120 + 3 * i)
        path = folder / (f"{i}.jpg" if i % 3 else f"{i}.png")
        Image.new("RGB", size, (10 * i,) * 3).save(path)
        samples.append((path, _label_of(i)))
    return samples


def _index_of(image: Image.Image) -> int:
    return round(np.asarray(image)[..., 0].mean() / 10)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    samples = _make_images(root / "images")
    index = write_shards(samples, root / "out", max_side=64, shard_size=10)
    assert [entry["count"] for entry in index["shards"]] == [10, 10, 5]
    return root / "out"


def test_write_shards_layout(shard_dir):
    index = json.loads((shard_dir / INDEX_NAME).read_text())
    assert index["num_samples"] == 25 and index["skipped"] == [] and index["max_side"] == 64
    assert sorted(p.name for p in shard_dir.iterdir()) == [INDEX_NAME, *(f"shard-00000{i}.tar" for i in range(3))]
    with tarfile.open(shard_dir / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["000000.jpg", "000000.cls", "000001.jpg", "000001.cls"]
        assert tar.extractfile("000003.cls").read() == str(_label_of(3)).encode()


def test_round_trip_labels_and_sizes(shard_dir):
    dataset = ShardDataset(shard_dir, shuffle_buffer=8)
    items = list(dataset)
    assert len(items) == len(dataset) == 25
    indices = [_index_of(image) for image, _ in items]
    assert sorted(indices) == list(range(25))
    assert indices != list(range(25))  # shuffled
    for image, label in items:
        assert max(image.size) <= 64 and image.mode == "RGB"
        assert label == _label_of(_index_of(image))


def test_encoded_lists_every_sample_in_shard_order(shard_dir):
    items = list(ShardDataset(shard_dir).encoded())
    assert [_index_of(image.decode()[0]) for image, _ in items] == list(range(25))
    assert all(isinstance(image, EncodedImage) and label == _label_of(i) for i, (image, label) in enumerate(items))


def test_epochs_reorder_deterministically(shard_dir):
    dataset = ShardDataset(shard_dir, shuffle_buffer=8, seed=3)

    def order(epoch):
        dataset.set_epoch(epoch)
        return [_index_of(image) for image, _ in dataset]

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_transform_receives_encoded_image(shard_dir):
    seen = []
    dataset = ShardDataset(shard_dir, transform=lambda image: seen.append(image) or image.size)
    next(iter(dataset))
    assert isinstance(seen[0], EncodedImage)
    view, _ = next(iter(ShardDataset(shard_dir, transform=maskfeat_transform(32))))
    assert view.shape == (3, 32, 32)


def _small_array(image: EncodedImage) -> torch.Tensor:
    return torch.from_numpy(np.array(image.decode()[0].resize((8, 8))))


def test_workers_and_ranks_split_the_samples(shard_dir, monkeypatch):
    dataset = ShardDataset(shard_dir, transform=_small_array, shuffle_buffer=4)
    loader = build_loader(dataset, 5, shuffle=True, num_workers=2, seed=0, drop_last=False)
    indices = [_index_of(Image.fromarray(image.numpy())) for batch, _ in loader for image in batch]
    assert sorted(indices) == list(range(25))
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(shards_module, "_world", lambda rank=rank: (rank, 2))
        dataset = ShardDataset(shard_dir, shuffle_buffer=4)
        per_rank.append([_index_of(image) for image, _ in dataset])
        assert len(per_rank[-1]) == len(dataset) == 12
    # shards of 10, 10, 5 dealt to 2 ranks: one rank holds 15 samples (shows 12), the other 10 (re-reads 2)
    assert len(set(per_rank[0]) | set(per_rank[1])) == 22 and not set(per_rank[0]) & set(per_rank[1])


def test_fewer_shards_than_slots_split_by_sample(shard_dir, monkeypatch):
    per_rank = []
    for rank in range(4):  # 4 ranks > 3 shards: every rank reads all shards, keeps every 4th sample
        monkeypatch.setattr(shards_module, "_world", lambda rank=rank: (rank, 4))
        per_rank.append([_index_of(image) for image, _ in ShardDataset(shard_dir, shuffle_buffer=4)])
    assert [len(indices) for indices in per_rank] == [6] * 4
    assert len(set().union(*per_rank)) == 24


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_tar_reader_handles_standard_formats(tmp_path, tar_format):
    names = ["000001.jpg", "a" * 150 + ".cls", "dir/" * 30 + "x.jpg", "ü.cls"]
    path, expected = tmp_path / "t.tar", []
    with tarfile.open(path, "w", format=tar_format, encoding="utf-8") as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a regular file: passed over
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = i + 1
            try:
                tar.addfile(info, io.BytesIO(bytes(range(i + 1))))
            except ValueError:  # a name plain ustar cannot hold
                continue
            expected.append((name, bytes(range(i + 1))))
    with open(path, "rb") as stream:
        assert list(shards_module._tar_files(stream)) == expected
    assert len(expected) >= 3


def test_missing_directory_and_bad_index(tmp_path):
    with pytest.raises(InputError, match="no shard index"):
        ShardDataset(tmp_path / "absent")
    (tmp_path / INDEX_NAME).write_text("{not json")
    with pytest.raises(InputError, match="not a shard index"):
        ShardDataset(tmp_path)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"shards": [{"name": "gone.tar", "count": 3}]}))
    with pytest.raises(InputError, match="missing"):
        ShardDataset(tmp_path)


def test_unreadable_input_is_skipped_and_listed(tmp_path):
    samples = _make_images(tmp_path / "images", count=4)
    (tmp_path / "images" / "1.jpg").write_bytes(b"garbage")
    index = write_shards([*samples, (tmp_path / "nope.jpg", 0)], tmp_path / "out", max_side=64)
    assert index["num_samples"] == 3
    assert len(index["skipped"]) == 2 and "nope.jpg" in index["skipped"][1]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_corrupt_member_is_skipped_and_counted(shard_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / INDEX_NAME).write_text((shard_dir / INDEX_NAME).read_text())
    for shard in shard_dir.glob("*.tar"):
        with tarfile.open(shard) as source, tarfile.open(broken / shard.name, "w") as target:
            for member in source:
                data = source.extractfile(member).read()
                if member.name == "000004.jpg":
                    data = data[:20] + b"\x00" * (len(data) - 20)  # valid header, destroyed entropy data
                member.size = len(data)
                target.addfile(member, io.BytesIO(data))
    dataset = ShardDataset(broken, shuffle_buffer=0)
    items = list(dataset)
    assert dataset.skipped == 1
    assert len(items) == 25  # the quota is refilled from the next pass, keeping DDP ranks in step
    assert 4 not in [_index_of(image) for image, _ in items]


def test_truncated_shard_counts_and_continues(shard_dir, tmp_path):
    broken = tmp_path / "cut"
    broken.mkdir()
    (broken / INDEX_NAME).write_text((shard_dir / INDEX_NAME).read_text())
    for shard in shard_dir.glob("*.tar"):
        data = shard.read_bytes()
        (broken / shard.name).write_bytes(data[: len(data) // 2] if shard.name.endswith("1.tar") else data)
    dataset = ShardDataset(broken, shuffle_buffer=0)
    items = list(dataset)
    assert dataset.skipped >= 1 and len(items) == 25


# ---------------------------------------------------------------------------- build_loader


class _Draws(Dataset):
    """Sample i = (i, a draw from torch's global RNG): the draw shows how the sample was seeded."""

    classes = ("a", "b")

    def __len__(self):
        return 20

    def __getitem__(self, index):
        return index, torch.rand(1).item()


def _epoch(loader, epoch):
    set_epoch(loader, epoch)
    return [(int(i), float(x)) for indices, draws in loader for i, x in zip(indices, draws, strict=True)]


def test_loader_order_is_seeded_per_epoch():
    first = build_loader(_Draws(), 4, shuffle=True, num_workers=0, seed=1, drop_last=False)
    second = build_loader(_Draws(), 4, shuffle=True, num_workers=0, seed=1, drop_last=False)
    assert _epoch(first, 0) == _epoch(second, 0)
    assert [i for i, _ in _epoch(first, 0)] != [i for i, _ in _epoch(first, 1)]
    other_seed = build_loader(_Draws(), 4, shuffle=True, num_workers=0, seed=2, drop_last=False)
    assert [i for i, _ in _epoch(first, 0)] != [i for i, _ in _epoch(other_seed, 0)]
    assert sorted(i for i, _ in _epoch(first, 3)) == list(range(20))
    assert first.dataset.classes == ("a", "b")


def test_loader_augmentation_independent_of_workers():
    single = _epoch(build_loader(_Draws(), 4, shuffle=True, num_workers=0, seed=1, drop_last=False), 2)
    loader = build_loader(_Draws(), 4, shuffle=True, num_workers=2, seed=1, drop_last=False)
    assert loader.persistent_workers
    _epoch(loader, 0)
    assert _epoch(loader, 2) == single  # after another epoch on the same persistent workers
    assert len({x for _, x in single}) == 20


def test_loader_leaves_main_rng_alone():
    loader = build_loader(_Draws(), 4, shuffle=False, num_workers=0, seed=1, drop_last=True)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(loader, 0)
    assert torch.equal(torch.rand(3), expected)


def test_loader_distributed(tmp_path):
    with pytest.raises(InputError, match="process group"):
        build_loader(_Draws(), 4, shuffle=True, num_workers=0, seed=0, drop_last=False, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = build_loader(_Draws(), 4, shuffle=True, num_workers=0, seed=0, drop_last=False, distributed=True)
        order = [i for i, _ in _epoch(loader, 0)]
        assert sorted(order) == list(range(20)) and order != [i for i, _ in _epoch(loader, 1)]
    finally:
        dist.destroy_process_group()


def test_loader_rejects_bad_arguments():
    with pytest.raises(InputError, match="batch_size=0"):
        build_loader(_Draws(), 0, shuffle=False, num_workers=0, seed=0, drop_last=False)
