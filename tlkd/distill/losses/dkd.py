"""Decoupled knowledge distillation (Zhao et al. 2022, mdistiller ``DKD.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.distill.losses.kd import standardize_logits


def _binary_log_probs(log_p: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``[log p(target), log p(not target)]`` per row, computed in log space (a logsumexp
    over the non-target log-probabilities), so neither underflows at large margins."""
    target = log_p.masked_fill(~gt, float("-inf")).logsumexp(dim=1)
    rest = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1)
    return torch.stack([target, rest], dim=1)


def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    standardize: bool = False,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022), as mdistiller's ``dkd_loss``: KD split into
    target-class KD (binary: target vs. the rest) weighted by ``alpha`` and non-target-class
    KD (the distribution over the other classes, the target pushed out by ``-1000``)
    weighted by ``beta``, both KL x T^2 averaged over the batch.

    The binary probabilities are computed in log space: the reference's ``log(p)`` of the
    summed probabilities has the same value and gradient where float32 can hold them, and
    tlkd's stays finite where ``p(not target)`` underflows (no clamp that zeroes the
    gradient of a confident student).

    ``standardize``: both logits z-scored per row first (Sun et al. 2024, whose official code
    does this in its ``dkd_loss``); ``temperature`` is then the base temperature (see
    :func:`tlkd.distill.losses.kd.kd_loss`)."""
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
    gt = F.one_hot(targets, student.shape[1]).bool()
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    tckd = F.kl_div(
        _binary_log_probs(log_p_s, gt),
        _binary_log_probs(log_p_t, gt),
        reduction="batchmean",
        log_target=True,
    )
    # distributions over the non-target classes: mask the target out before the softmax
    masked = gt * 1000.0
    log_q_s = F.log_softmax(student / temperature - masked, dim=1)
    q_t = F.softmax(teacher / temperature - masked, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean")
    return (alpha * tckd + beta * nckd) * temperature**2


class DKD(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature = cfg.alpha, cfg.beta, cfg.temperature

    def forward(
        self, student, teacher, targets
    ) -> torch.Tensor:  # standardize: applied by the objective
        return dkd_loss(student, teacher, targets, self.alpha, self.beta, self.temperature)
