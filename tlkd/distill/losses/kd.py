"""Softmax distillation (Hinton et al. 2015), and the logit standardization (Sun et al. 2024)
that every temperature-based logit loss (kd, dkd, dist) can apply first."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STD_EPS = 1e-7  # added to the standard deviation, as the reference's normalize


def standardize_logits(logits: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """Z-score each row over the classes: ``(z - mean) / (std + eps)`` with the unbiased
    (``n - 1``) standard deviation, as ``normalize`` in Sun et al. 2024's official code
    (sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py)."""
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (logits.std(dim=1, keepdim=True) + eps)


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 4.0,
    standardize: bool = False,
) -> torch.Tensor:
    """KL(teacher_T || student_T) scaled by T^2 so gradients keep their size across
    temperatures.

    With ``standardize`` (logit standardization, Sun et al. 2024) both logits are first
    z-scored per row (:func:`standardize_logits`), so ``temperature`` is the paper's *base*
    temperature: each sample's effective temperature is it times that sample's logit standard
    deviation, and the T^2 factor uses the base temperature, as the official code."""
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
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
        self.temperature = cfg.temperature  # standardize: applied by the objective

    def forward(self, student, teacher, targets=None) -> torch.Tensor:
        return kd_loss(student, teacher, self.temperature)
