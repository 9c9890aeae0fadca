"""Attention transfer (Zagoruyko & Komodakis 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a feature map (Zagoruyko & Komodakis 2017): the channel mean of
    |f|^p, flattened and L2-normalised per sample (for p=2, or the non-negative features
    after a ReLU, the reference code's ``f.pow(p).mean(1)``)."""
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], p: float = 2.0
) -> torch.Tensor:
    """Attention transfer as the reference code (RepDistiller ``distiller_zoo/AT.py``,
    mdistiller ``AT.py``): per stage the mean over batch and positions of the squared
    difference of the normalised attention maps, SUMMED over the chosen stages. Where the
    spatial sizes differ, the larger feature map is adaptive-average-pooled to the smaller."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        if s.shape[-2:] != size:
            s = F.adaptive_avg_pool2d(s, size)
        if t.shape[-2:] != size:
            t = F.adaptive_avg_pool2d(t, size)
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return total


class AT(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.p = cfg.p

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        return at_loss(student, teacher, self.p)
