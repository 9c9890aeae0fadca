"""Source and target batches side by side."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class _Both:
    def __init__(self, *samplers: Any) -> None:
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)


class PairedLoader:
    """Each labelled ``source`` batch joined by an unlabelled ``target`` batch (target -1),
    cycling the target. An epoch is the source's. Both loaders share one generator (the
    source's), so replaying it from an epoch's start replays both streams (exact resume)."""

    def __init__(self, source: Any, target: Any) -> None:
        self.source, self.target = source, target
        self.sampler = _Both(source.sampler, target.sampler)
        self.generator = source.generator

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        target = iter(self.target)
        for xs, ys in self.source:
            try:
                xt, _ = next(target)
            except StopIteration:
                target = iter(self.target)
                xt, _ = next(target)
            yield torch.cat([xs, xt.to(xs.device)]), torch.cat([ys, ys.new_full((len(xt),), -1)])
