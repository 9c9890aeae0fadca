"""Distillation losses as plain functions of tensors (each unit-tested on hand-made tensors,
and against transcriptions of the papers' reference code in tests/test_distill_parity.py).

Logit losses take student and teacher logits of the same classes; feature losses take lists of
feature maps. The formulas follow the papers cited on each function; the code is tlkd's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ensemble_logits(
    teachers: list[torch.Tensor], weights: list[float], temperature: float = 1.0
) -> torch.Tensor:
    """Several teachers as one: logits ``z`` whose ``softmax(z / T)`` is the weighted mean of
    the teachers' ``softmax(z_i / T)`` (averaged soft targets, as in multi-teacher KD: Hinton
    et al. 2015's ensembles, Fukuda et al. 2017, You et al. 2017). Every logit loss uses this
    rule at its own temperature (``hard`` at T=1), so kd, hard, dkd and dist see the same
    ensemble. One teacher is returned unchanged."""
    if len(teachers) == 1:
        return teachers[0]
    log_w = torch.tensor([math.log(w / sum(weights)) for w in weights], device=teachers[0].device)
    log_p = torch.stack([F.log_softmax(t / temperature, dim=1) for t in teachers])
    return temperature * torch.logsumexp(log_p + log_w.view(-1, 1, 1), dim=0)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Softmax distillation (Hinton et al. 2015): KL(teacher_T || student_T) scaled by T^2 so
    gradients keep their size across temperatures."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def kd_loss_from_probs(
    student: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """:func:`kd_loss` against given soft targets (e.g. several teachers' averaged softmax)."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    return F.kl_div(log_p_s, teacher_probs, reduction="batchmean") * temperature**2


def hard_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Hard-label distillation: cross-entropy against the teacher's top class."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


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
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022), as mdistiller's ``dkd_loss``: KD split into
    target-class KD (binary: target vs. the rest) weighted by ``alpha`` and non-target-class
    KD (the distribution over the other classes, the target pushed out by ``-1000``)
    weighted by ``beta``, both KL x T^2 averaged over the batch.

    The binary probabilities are computed in log space: the reference's ``log(p)`` of the
    summed probabilities has the same value and gradient where float32 can hold them, and
    tlkd's stays finite where ``p(not target)`` underflows (no clamp that zeroes the
    gradient of a confident student)."""
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
) -> torch.Tensor:
    """DIST (Huang et al. 2022): match relations instead of exact probabilities. Inter-class:
    1 - Pearson correlation of each sample's class probabilities; intra-class: the same for
    each class's probabilities across the batch."""
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    inter = (1 - _pearson_rows(p_s, p_t)).mean()
    intra = (1 - _pearson_rows(p_s.t(), p_t.t())).mean()
    return (beta * inter + gamma * intra) * temperature**2


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


def fitnet_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """FitNet hints (Romero et al. 2015): mean squared error between the regressed student
    features and the teacher's (RepDistiller's ``HintLoss``, ``nn.MSELoss()``), summed over
    the chosen hint layers (one by default, as the reference)."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        total = total + F.mse_loss(s, t)
    return total
