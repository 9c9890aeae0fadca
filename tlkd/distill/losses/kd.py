"""Softmax distillation (Hinton et al. 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(teacher_T || student_T) scaled by T^2 so gradients keep their size across
    temperatures."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def kd_loss_from_probs(
    student: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """:func:`kd_loss` against given soft targets (e.g. several teachers' averaged softmax)."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    return F.kl_div(log_p_s, teacher_probs, reduction="batchmean") * temperature**2


class KD(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.temperature = cfg.temperature

    def forward(self, student, teacher, targets=None) -> torch.Tensor:
        return kd_loss(student, teacher, self.temperature)
