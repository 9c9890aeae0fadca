"""Running a model over a loader without gradients: validation and evaluate share it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader

from tlkd.engine.device import autocast


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, on the CPU) and targets of ``loader``, in order."""
    model.eval()
    logits, targets = [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            out = model(images)
        logits.append(out.float().cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Percent of rows whose target is among the ``k`` highest scores (all of them when
    there are fewer than ``k`` classes): timm's ``accuracy``."""
    return accuracy(logits, targets, topk=(k,))[0].item()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    top1, top5 = accuracy(logits, targets, topk=(1, 5))  # one top-k pass for both
    return {
        "loss": F.cross_entropy(logits, targets).item(),
        "top1": top1.item(),
        "top5": top5.item(),
    }
