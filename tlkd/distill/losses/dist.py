"""DIST: knowledge distillation from a stronger teacher (Huang et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.distill.losses.kd import standardize_logits


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    standardize: bool = False,
) -> torch.Tensor:
    """DIST (Huang et al. 2022): match relations instead of exact probabilities. Inter-class:
    1 - Pearson correlation of each sample's class probabilities; intra-class: the same for
    each class's probabilities across the batch.

    ``standardize``: both logits z-scored per row first, as Sun et al. 2024 do for KD and DKD
    (their code has no DIST: this applies the same pre-process); ``temperature`` is then the
    base temperature (see :func:`tlkd.distill.losses.kd.kd_loss`)."""
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    inter = (1 - _pearson_rows(p_s, p_t)).mean()
    intra = (1 - _pearson_rows(p_s.t(), p_t.t())).mean()
    return (beta * inter + gamma * intra) * temperature**2


class DIST(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.beta, self.gamma, self.temperature = cfg.beta, cfg.gamma, cfg.temperature

    def forward(
        self, student, teacher, targets=None
    ) -> torch.Tensor:  # standardize: applied by the objective
        return dist_loss(student, teacher, self.beta, self.gamma, self.temperature)
