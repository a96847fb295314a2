"""Pre-resized JPEG shards in WebDataset's tar layout, and a streaming reader for them.

Layout of `out_dir`: `shard-000000.tar`, … each holding `KEY.jpg` + `KEY.cls` pairs (KEY = the sample's
index in the input list, 6+ digits; `.cls` = the label in ASCII), and `index.json` with the shard names,
their sample counts and the inputs that could not be read. The `webdataset` package reads these shards
as they are; this module needs only the standard library's tarfile.
"""

import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from semanticmim.data.decode import EncodedImage, UnreadableImage
from semanticmim.data.loader import sample_seed, seeded_rngs
from semanticmim.errors import InputError

__all__ = ["INDEX_NAME", "ShardDataset", "write_shards"]

INDEX_NAME = "index.json"
_MAX_WORKER_SLOTS = 1024
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_SHARD_ORDER = 2**40  # the sample_seed "index" of the per-epoch shard order, beyond any sample key
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# writing


def write_shards(
    samples: Sequence[tuple[Path, int]],
    out_dir: str | Path,
    max_side: int = 320,
    shard_size: int = 1000,
    quality: int = 90,
    workers: int = 1,
) -> dict[str, Any]:
    """Write `samples` (image path, label) as JPEG shards whose longer side is ≤ max_side.

    Images are decoded (at a reduced JPEG DCT scale where that keeps ≥ max_side), shrunk with Lanczos
    when larger, re-encoded at `quality`. Unreadable images are skipped and listed in the index. Each
    shard and the index are written to a temporary name and renamed, so a killed run leaves no
    half-written file. `workers` > 1 writes shards in parallel processes. Returns the index.
    """
    if not samples:
        raise InputError("samples: expected at least one (path, label) pair, got none")
    if max_side < 1 or shard_size < 1 or not 1 <= quality <= 100:
        raise InputError(f"max_side={max_side}, shard_size={shard_size}, quality={quality}: expected ≥1, ≥1, 1..100")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_width = max(6, len(str(len(samples) - 1)))
    jobs = [
        (out_dir / f"shard-{number:06d}.tar", list(enumerate(samples))[start : start + shard_size])
        for number, start in enumerate(range(0, len(samples), shard_size))
    ]
    arguments = [(path, chunk, max_side, quality, key_width) for path, chunk in jobs]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_write_shard, *zip(*arguments, strict=True)))
    else:
        results = [_write_shard(*args) for args in arguments]
    index = {
        "format": "webdataset",
        "max_side": max_side,
        "quality": quality,
        "num_samples": sum(count for count, _ in results),
        "shards": [{"name": path.name, "count": count} for (path, _), (count, _) in zip(jobs, results, strict=True)],
        "skipped": [entry for _, skipped in results for entry in skipped],
    }
    _write_atomically(out_dir / INDEX_NAME, json.dumps(index, indent=1).encode())
    return index


def _write_shard(
    path: Path, chunk: list[tuple[int, tuple[Path, int]]], max_side: int, quality: int, key_width: int
) -> tuple[int, list[str]]:
    """One tar of KEY.jpg/KEY.cls pairs → (samples written, 'path: reason' of skipped inputs)."""
    count, skipped = 0, []
    temporary = path.with_name(path.name + ".tmp")
    with tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, (image_path, label) in chunk:
            try:
                jpeg = _shrunk_jpeg(image_path, max_side, quality)
            except UnreadableImage as error:
                log.warning("skipped %s", error)
                skipped.append(str(error))
                continue
            _add_member(tar, f"{key:0{key_width}d}.jpg", jpeg)
            _add_member(tar, f"{key:0{key_width}d}.cls", str(int(label)).encode())
            count += 1
    os.replace(temporary, path)
    return count, skipped


def _shrunk_jpeg(path: Path, max_side: int, quality: int) -> bytes:
    encoded = EncodedImage.from_file(path)
    image, _ = encoded.decode(max_reduction=max(encoded.size) / max_side)
    if max(image.size) > max_side:
        factor = max_side / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------------
# reading


class ShardDataset(IterableDataset):
    """Stream `(transform(image), label)` from a `write_shards` directory.

    Shards are shuffled per epoch and dealt to DDP ranks, then to DataLoader workers; with fewer shards
    than (rank, worker) slots every slot reads all shards and keeps every slots-th sample. Every rank
    yields exactly num_samples // world_size samples per epoch (re-reading its share if it falls
    short, e.g. after skipping unreadable members), so that DDP ranks stay in step; with shards of
    unequal size a rank may then see some of its samples twice and miss some of another rank's, so
    write many more shards than ranks × workers. Samples pass through a shuffle buffer; each one's
    augmentation is seeded from (seed, epoch, key). The transform receives an `EncodedImage` (none: a
    decoded RGB PIL image). Unreadable members are skipped, logged and counted in `skipped`.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ):
        self.root = Path(root)
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise InputError(f"{index_path}: no shard index; expected a directory written by write_shards")
        try:
            index = json.loads(index_path.read_text())
            self.shards = [(self.root / entry["name"], int(entry["count"])) for entry in index["shards"]]
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"{index_path}: not a shard index ({type(error).__name__}: {error})") from None
        missing = [str(path) for path, _ in self.shards if not path.is_file()]
        if missing:
            raise InputError(
                f"{self.root}: {len(missing)} shard(s) listed in {INDEX_NAME} are missing, e.g. {missing[0]}"
            )
        self.num_samples = sum(count for _, count in self.shards)
        if self.num_samples == 0:
            raise InputError(f"{index_path}: the shards hold no samples")
        self.transform, self.shuffle_buffer, self.seed = transform, shuffle_buffer, seed
        # shared with DataLoader workers (also persistent ones), which hold copies of this object
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._skipped = torch.zeros(_MAX_WORKER_SLOTS, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    @property
    def skipped(self) -> int:
        """Members skipped as unreadable so far, over all workers of this process."""
        return int(self._skipped.sum())

    def __len__(self) -> int:
        return self.num_samples // _world()[1]

    def encoded(self) -> Iterator[tuple[EncodedImage, int]]:
        """Every readable sample once, in shard order, not decoded: for inspection and benchmarks."""
        for path, count in self.shards:
            for _, name, jpeg, label in self._read(path, count):
                try:
                    yield EncodedImage(jpeg, name), label
                except UnreadableImage as error:
                    self._skip(str(error))

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        epoch = int(self._epoch[0])
        rank, world = _world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        shards = [(path, count) for path, count in self.shards if count]
        random.Random(sample_seed(self.seed, epoch, _SHARD_ORDER)).shuffle(shards)  # same in every process
        shares = _deal(shards, rank, world, workers)
        quota = _split(len(self), [share.count for share in shares])[worker]
        rng = random.Random(sample_seed(self.seed, epoch, rank * workers + worker))
        yield from self._stream(shares[worker], quota, epoch, worker, rng)

    def _stream(self, share: "_Share", quota: int, epoch: int, worker: int, rng: random.Random) -> Iterator:
        """`quota` decoded samples of one share, each pass shuffled through the buffer; a pass is
        repeated only when unreadable members left the quota unfilled."""
        yielded = 0
        while yielded < quota:
            raw = (sample for shard in share.shards for sample in self._read(*shard))
            if share.stride > 1:
                raw = (sample for position, sample in enumerate(raw) if position % share.stride == share.offset)
            decoded_any = False
            for key, name, jpeg, label in _shuffled(raw, self.shuffle_buffer, rng):
                item = self._decode(key, name, jpeg, epoch, worker)
                if item is None:
                    continue
                decoded_any = True
                yield item, label
                yielded += 1
                if yielded == quota:
                    return
            if not decoded_any:
                raise InputError(f"{self.root}: no sample of this worker's share of the shards can be decoded")

    def _read(self, path: Path, expected: int) -> Iterator[tuple[int, str, bytes, int]]:
        """(key, member name, jpeg bytes, label) of one shard. A damaged or short tar (fewer samples
        than the index says) ends its shard early and counts as one skip."""
        pending: dict[str, dict[str, bytes]] = {}
        found = 0
        try:
            with open(path, "rb", buffering=1 << 20) as stream:
                for name, data in _tar_files(stream):
                    key, _, extension = name.rpartition(".")
                    if extension not in ("jpg", "cls"):
                        continue
                    parts = pending.setdefault(key, {})
                    parts[extension] = data
                    if len(parts) == 2:
                        del pending[key]
                        found += 1
                        sample = self._parse(path, key, parts)
                        if sample is not None:
                            yield sample
        except (tarfile.TarError, OSError, EOFError) as error:
            self._skip(f"{path}: damaged shard, rest skipped ({type(error).__name__}: {error})")
            return
        for key in pending:
            self._skip(f"{path}/{key}: incomplete sample (jpg or cls member missing)")
        if found + len(pending) < expected:
            self._skip(f"{path}: ends after {found + len(pending)} of its {expected} samples (truncated?)")

    def _parse(self, path: Path, key: str, parts: dict[str, bytes]) -> tuple[int, str, bytes, int] | None:
        try:
            return int(key), f"{path}/{key}.jpg", parts["jpg"], int(parts["cls"])
        except ValueError:
            self._skip(f"{path}/{key}: key or label is not an integer")
            return None

    def _decode(self, key: int, name: str, jpeg: bytes, epoch: int, worker: int) -> Any:
        try:
            image = EncodedImage(jpeg, name)
            if self.transform is None:
                return image.decode()[0]
            with seeded_rngs(sample_seed(self.seed, epoch, key)):
                return self.transform(image)
        except UnreadableImage as error:
            self._skip(str(error), worker)
            return None

    def _skip(self, reason: str, worker: int | None = None) -> None:
        log.warning("skipped %s", reason)
        if worker is None:
            info = get_worker_info()
            worker = info.id if info else 0
        self._skipped[worker % _MAX_WORKER_SLOTS] += 1


def _tar_files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files in a tar stream (ustar, with pax/GNU long names).

    3× less per-member overhead than tarfile's stream mode, which matters for small images.
    Raises tarfile.ReadError for a bad header, EOFError for a cut member.
    """
    long_name = None
    while len(header := stream.read(_BLOCK)) == _BLOCK and header != _ZERO_BLOCK:
        stored = header[148:156].strip(b"\0 ")
        if not stored or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):  # 256: 8 spaces
            raise tarfile.ReadError("bad tar header checksum")
        size, kind = int(header[124:136].strip(b"\0 ") or b"0", 8), header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise EOFError(f"member holds {len(data)} of its {size} bytes")
        stream.read(-size % _BLOCK)
        if kind in (b"x", b"L"):  # pax extended header / GNU long name: the next member's name
            long_name = _long_name(kind, data) or long_name
        elif kind in (b"0", b"\0"):
            prefix, name = header[345:500].split(b"\0")[0], header[:100].split(b"\0")[0]
            yield long_name or (prefix + b"/" + name if prefix else name).decode(), data
            long_name = None


def _long_name(kind: bytes, data: bytes) -> str | None:
    if kind == b"L":
        return data.rstrip(b"\0").decode()
    for record in data.decode().splitlines():  # pax records: "LENGTH key=value"
        key, _, value = record.partition(" ")[2].partition("=")
        if key == "path":
            return value
    return None


class _Share(NamedTuple):
    """One DataLoader worker's part of the shards: every `stride`-th sample from `offset` of `shards`."""

    shards: list[tuple[Path, int]]
    stride: int
    offset: int
    count: int  # samples in it, by the index


def _deal(shards: list[tuple[Path, int]], rank: int, world: int, workers: int) -> list[_Share]:
    """This rank's workers' shares: whole shards when there are enough for every (rank, worker),
    else every shard read by all and split sample by sample."""
    slots = world * workers
    if len(shards) >= slots:
        mine = shards[rank::world]
        return [
            _Share(part, 1, 0, sum(count for _, count in part)) for part in (mine[w::workers] for w in range(workers))
        ]
    total = sum(count for _, count in shards)
    offsets = [rank * workers + w for w in range(workers)]
    return [_Share(shards, slots, offset, len(range(offset, total, slots))) for offset in offsets]


def _split(total: int, weights: list[int]) -> list[int]:
    """`total` in integer parts proportional to `weights` (the first parts take the remainder)."""
    parts = [total * weight // max(sum(weights), 1) for weight in weights]
    for position in range(total - sum(parts)):
        parts[position % len(parts)] += 1
    return parts


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shuffled(samples: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """A reservoir shuffle: keep `buffer_size` samples, emit a random one as each new one arrives."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        position = rng.randrange(buffer_size)
        buffer[position], sample = sample, buffer[position]
        yield sample
    rng.shuffle(buffer)
    yield from buffer
