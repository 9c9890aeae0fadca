"""Each training batch's dataset indices, for loss terms that keep per-sample state (crd's
memory banks, tlkd/distill/losses/crd.py).

The loaders yield ``(images, targets)`` only, and the trainer stays as it is: like the teacher
cache's ``Slot`` (tlkd/distill/cache.py), a thin wrapper around the train loader writes the
indices of the batch it yields into a :class:`BatchIndices` slot that the term reads in its
forward. Both data paths take the batches as consecutive runs of the train sampler's order (the
in-memory MemoryLoader chunks it itself, a DataLoader through its batch sampler), and that
order, tlkd.engine.distributed.GlobalBatchSampler's, is a pure function of (seed, epoch): the
wrapper replays it and hands out as many indices as each batch has rows. Under torchrun the
sampler gives each rank its slice of the global batch as indices into the whole training set,
so the indices are global on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tlkd.engine.distributed import GlobalBatchSampler
from tlkd.errors import TlkdError


@dataclass
class BatchIndices:
    """The current training batch's indices into the training set (None between epochs)."""

    indices: torch.Tensor | None = None


class IndexedLoader:
    """``loader`` unchanged (same batches, same RNG draws), writing each batch's dataset
    indices into ``slot`` before yielding it. ``labels``: the training set's labels; every
    batch's targets are checked against them, so an order out of step is an error, not a
    silently wrong loss. ``None`` for an unlabelled set (SHOT's target images, all -1), which
    has nothing to compare: the indices then rest on the order alone (the sampler, checked to
    be the GlobalBatchSampler the loader draws from), and only a batch with more rows than the
    order has left is an error."""

    def __init__(self, loader: Any, slot: BatchIndices, labels: torch.Tensor | None) -> None:
        if not isinstance(loader.sampler, GlobalBatchSampler):
            raise TlkdError(
                f"per-sample losses need the training sampler's order; {type(loader).__name__} "
                f"samples with {type(loader.sampler).__name__}"
            )
        self.loader, self.slot, self.labels = loader, slot, labels
        self.sampler, self.generator = loader.sampler, loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # the trainer has called sampler.set_epoch: this is the order the loader draws
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        start = 0
        try:
            for images, targets in self.loader:
                idx = order[start : start + len(targets)]
                start += len(targets)
                if len(idx) != len(targets):
                    raise TlkdError(
                        f"the train loader gave more rows than its sampler's {len(order)}"
                    )
                if self.labels is not None and not torch.equal(self.labels[idx], targets.cpu()):
                    raise TlkdError("batch indices out of step with the train loader's batches")
                self.slot.indices = idx
                yield images, targets
        finally:
            self.slot.indices = None
