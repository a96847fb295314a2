"""Deterministic, resumable sampling that does not depend on worker count or restarts.

`ResumableSampler` yields `(epoch, index)` keys: a seeded permutation per epoch, sharded over ranks,
optionally starting part-way through the epoch. `SeededSamples` seeds every RNG an augmentation may use
from `(seed, epoch, index)` before reading sample `index`, so a resumed run sees the very same batches.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


class ResumableSampler(Sampler[tuple[int, int]]):
    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.per_rank = num_samples // world_size  # equal shards: every rank takes the same number of steps
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch`, skipping the first `start` samples of this rank's shard."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        shard = order[self.rank :: self.world_size][: self.per_rank]
        return iter((self.epoch, int(index)) for index in shard[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class SeededSamples(Dataset):
    """Wraps a map-style dataset; `dataset[(epoch, index)]` reads `index` with seeded RNGs."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        if get_worker_info() is None:  # in the main process: leave the training RNG untouched
            with torch.random.fork_rng(devices=[]):
                return self._read(index, seed)
        return self._read(index, seed)

    def _read(self, index: int, seed: int):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]
