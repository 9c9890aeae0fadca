"""torch.distributed under torchrun: process group, rank-aware helpers, the batch sampler.

`torchrun --nproc_per_node=N -m tlkd finetune cfg.yaml` sets WORLD_SIZE/RANK/LOCAL_RANK;
tlkd then trains with DistributedDataParallel (nccl on GPUs, gloo on CPUs). train.batch_size
stays the global batch: each process takes its share of every global batch, so N processes
see the same batches as one process would.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()
T = TypeVar("T")


def info() -> DistInfo:
    return _INFO


def init_from_env(device_spec: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (no-op for a single process)."""
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _INFO
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_spec not in ("cpu", "mps")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    _INFO = DistInfo(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))
    return _INFO


def shutdown() -> None:
    global _INFO
    if dist.is_initialized():
        dist.destroy_process_group()
    _INFO = DistInfo()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, then on the other ranks (which find what rank 0 wrote, e.g. a cache
    file). An exception on rank 0 is raised on every rank, so none waits for the others."""
    if not info().enabled:
        return fn()
    out, err = None, None
    if info().is_main:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - raised again below, on every rank
            err = e
    err = broadcast(err)
    if err is not None:
        raise err
    return out if info().is_main else fn()


def all_sum(values: list[float]) -> list[float]:
    if not info().enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. a stop signal reached one process)."""
    if not info().enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_cat(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate each tensor over ranks, in rank order (CPU tensors)."""
    if not info().enabled:
        return tensors
    gathered: list[Any] = [None] * info().world
    dist.all_gather_object(gathered, [t.cpu() for t in tensors])
    return tuple(torch.cat([g[i] for g in gathered]) for i in range(len(tensors)))


class GlobalBatchSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch) - a pure function of the epoch, so a
    resumed run replays the same order - and gives each rank its slice of every global
    batch. Drops the last incomplete global batch when there is at least one full batch.

    torch's DistributedSampler is not used: it hands each rank a contiguous share of the
    whole epoch, so N processes would train on other batches than one process does (and it
    pads the last share with repeated samples)."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        world: int = 1,
        rank: int = 0,
    ) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.drop_last = drop_last and size >= batch_size
        self.world, self.rank = world, rank
        self.local = batch_size // world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        usable = (self.size // self.batch_size) * self.batch_size if self.drop_last else self.size
        for start in range(0, usable, self.batch_size):
            batch = order[start : start + self.batch_size]
            share = -(-len(batch) // self.world)
            yield from batch[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        usable = (self.size // self.batch_size) * self.batch_size if self.drop_last else self.size
        full, rest = divmod(usable, self.batch_size)
        last = (
            min(max(rest - self.rank * -(-rest // self.world), 0), -(-rest // self.world))
            if rest
            else 0
        )
        return full * self.local + last
