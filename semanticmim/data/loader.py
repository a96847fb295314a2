"""DataLoader construction with reproducible order *and* reproducible augmentation.

Map-style datasets: the sampler yields `(epoch, index)` and every sample is produced right after
seeding torch, numpy and `random` from (seed, epoch, index). A sample's augmentation therefore does
not depend on the number of workers, on which worker drew it, or on whether training was resumed,
which is what bitwise resume needs. Iterable datasets (the shard reader) get their epoch
through their own `set_epoch` and seed themselves the same way.
"""

import contextlib
import hashlib
import itertools
import random
from collections.abc import Callable, Iterator, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, get_worker_info

from semanticmim.errors import InputError

__all__ = ["RowIndices", "build_loader", "sample_seed", "seed_everything", "seeded_rngs", "set_epoch"]


def build_loader(
    dataset: Dataset | IterableDataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool,
    distributed: bool = False,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader whose order and augmentation are functions of (seed, epoch) only.

    Call `set_epoch(loader, epoch)` before each epoch. Workers persist across epochs when
    num_workers > 0; batches are pinned when CUDA is available. `distributed` splits the samples
    over the ranks of the initialised process group (DistributedSampler, padded to equal length).
    An IterableDataset (e.g. `ShardDataset`) is passed through as it is: it shuffles, splits over
    ranks and workers, and seeds its samples itself, so `shuffle` and `distributed` do not apply.
    """
    if batch_size < 1 or num_workers < 0:
        raise InputError(f"batch_size={batch_size}, num_workers={num_workers}: expected ≥ 1 and ≥ 0")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise InputError("distributed=True: expected an initialised torch.distributed process group")
    common = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "collate_fn": collate_fn,
        "pin_memory": torch.cuda.is_available(),
        "drop_last": drop_last,
        "persistent_workers": num_workers > 0,
        "worker_init_fn": _seed_worker,
        "generator": torch.Generator().manual_seed(seed),
    }
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, **common)  # the iterable dataset shuffles and splits itself
    if not isinstance(dataset, Sized) or len(dataset) == 0:
        raise InputError("dataset: expected a map-style dataset with at least one sample")
    if distributed:
        order: Sampler[int] = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        order = _SeededOrder(len(dataset), shuffle, seed)
    samples = _SeededSamples(dataset, seed) if getattr(dataset, "draws_randomness", True) else _Batched(dataset)
    return DataLoader(samples, sampler=_EpochIndexSampler(order), **common)


def set_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Select `epoch`'s sample order and augmentation seeds (call before iterating each epoch).

    start: skip the first `start` samples of this rank's order (resuming part-way through an epoch;
    map-style datasets only)."""
    if isinstance(loader.sampler, _EpochIndexSampler):
        loader.sampler.set_epoch(epoch, start)
    elif start:
        raise InputError(f"start={start}: only map-style datasets can resume part-way through an epoch")
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (a hash: neighbouring indices give unrelated seeds)."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed torch's CPU generator, numpy's legacy global RNG and `random` (what augmentations draw from)."""
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run the block with every RNG seeded by `seed`. In the main process (num_workers=0) their states
    are restored afterwards, so that the training loop's own random streams do not move."""
    if get_worker_info() is not None:
        seed_everything(seed)
        yield
        return
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        seed_everything(seed)
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class _SeededOrder(Sampler[int]):
    """0..n-1, shuffled by a generator seeded with seed + epoch (DistributedSampler's convention)."""

    def __init__(self, size: int, shuffle: bool, seed: int):
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _EpochIndexSampler(Sampler[tuple[int, int]]):
    """Tags each index of `order` with the epoch, so that workers know it without shared state."""

    def __init__(self, order: Sampler[int]):
        self.order, self.epoch, self.start = order, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in itertools.islice(self.order, self.start, None))

    def __len__(self) -> int:
        return len(self.order) - self.start


class _Wrapped(Dataset):
    """A dataset fetched through `(epoch, index)` pairs; its attributes (classes, set_epoch…) still reach
    `loader.dataset`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        # "dataset": not set yet (unpickling in a worker), no recursion. Dunders such as `__getitems__`
        # must not reach the wrapped dataset: the DataLoader would fetch through it, bypassing the wrapper.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class _SeededSamples(_Wrapped):
    """dataset[index], produced right after seeding every RNG from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        super().__init__(dataset)
        self.seed = seed

    def __getitem__(self, epoch_index: tuple[int, int]):
        epoch, index = epoch_index
        with seeded_rngs(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]


class RowIndices(Dataset):
    """The row indices 0..n-1 of an in-memory table (cached features). Its items draw no randomness, so
    the loader fetches a whole batch in one call, unseeded: per-sample seeding cost more than the step."""

    draws_randomness = False

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index

    def __getitems__(self, indices: list[int]) -> list[int]:
        return list(indices)


class _Batched(_Wrapped):
    """A dataset that draws no randomness, fetched a batch at a time from `(epoch, index)` pairs."""

    def __getitems__(self, epoch_indices: list[tuple[int, int]]) -> list:
        indices = [index for _, index in epoch_indices]
        getitems = getattr(self.dataset, "__getitems__", None)
        return getitems(indices) if getitems is not None else [self.dataset[index] for index in indices]


def _seed_worker(worker_id: int) -> None:
    """numpy and `random` from the per-worker seed torch already set (each worker its own stream)."""
    seed_everything(torch.initial_seed())
