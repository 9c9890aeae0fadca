"""Similarity-preserving knowledge distillation (Tung & Mori 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    """The batch's N x N Gram matrix of the flattened features, each row L2-normalised."""
    f = feature.flatten(1)
    return F.normalize(f @ f.T, dim=1)


def sp_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """SP as RepDistiller's ``Similarity`` (``distiller_zoo/SP.py``): per pair the squared
    Frobenius distance of the row-normalised similarity matrices divided by N^2, SUMMED over
    the pairs (helper/loops.py sums the per-pair terms; one pair by default, the last stage's
    map, as the reference). In float32, also under autocast (a bf16 Gram matrix is too coarse
    for the small differences this loss measures)."""
    dtype = torch.promote_types(student[0].dtype, torch.float32)  # float64 stays
    total = student[0].new_zeros((), dtype=dtype)
    with torch.autocast(student[0].device.type, enabled=False):
        for s, t in zip(student, teacher, strict=True):
            with torch.no_grad():
                g_t = similarity_matrix(t.to(dtype))
            total = total + (similarity_matrix(s.to(dtype)) - g_t).pow(2).sum() / s.shape[0] ** 2
    return total


class SP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        return sp_loss(student, teacher)
