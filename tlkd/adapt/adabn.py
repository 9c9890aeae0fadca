"""AdaBN (Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation", 2016):
replace BatchNorm's running statistics by the target domain's. Only statistics change."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tlkd.engine.device import autocast


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> int:
    """Running mean/var of every BatchNorm layer := the exact average over ``batches``
    (momentum None), with everything else in eval mode. Returns the images seen."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    seen = 0
    try:
        for images, _ in batches:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                model(images)
            seen += len(images)
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for m, momentum in momenta.items():
            m.momentum = momentum
    return seen
