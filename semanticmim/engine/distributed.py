"""torchrun/DDP setup: gloo on CPU, NCCL on GPU; rank 0 alone logs and writes."""

from __future__ import annotations

import datetime
import itertools
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistEnv:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # A short timeout: when one rank dies, the others fail instead of hanging for 30 minutes.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    return DistEnv(rank, local_rank, world_size, torch_device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def shard_bounds(count: int, env: DistEnv) -> list[int]:
    """Contiguous, nearly equal shards of `count` samples, one per rank."""
    return [count * rank // env.world_size for rank in range(env.world_size + 1)]


def gather_shards(local: torch.Tensor, bounds: list[int], env: DistEnv, chunk: int = 65536) -> torch.Tensor:
    """Every rank's shard (rows bounds[r]:bounds[r+1]) concatenated in rank order, on every rank (CPU)."""
    if not env.distributed:
        return local
    longest = max(end - start for start, end in itertools.pairwise(bounds))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: len(local)] = local
    parts: list[list[torch.Tensor]] = [[] for _ in range(env.world_size)]
    for start in range(0, max(longest, 1), chunk):  # chunks bound the device memory the gather needs
        piece = padded[start:start + chunk].to(env.device)
        pieces = [torch.empty_like(piece) for _ in range(env.world_size)]
        dist.all_gather(pieces, piece)
        for rank, received in enumerate(pieces):
            parts[rank].append(received.cpu())
    return torch.cat([torch.cat(part)[: end - start]
                      for part, (start, end) in zip(parts, itertools.pairwise(bounds), strict=True)])


def all_ranks(flag: bool, env: DistEnv) -> bool:
    """True when `flag` holds on every rank (so that all ranks take the same branch)."""
    if not env.distributed:
        return flag
    value = torch.tensor(int(flag), device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
