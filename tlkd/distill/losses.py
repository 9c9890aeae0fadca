"""Distillation losses as plain functions of tensors (each unit-tested on hand-made tensors).

Logit losses take student and teacher logits of the same classes; feature losses take lists of
feature maps. The formulas follow the papers cited on each function; the code is tlkd's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def dkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): KD split into target-class KD (binary: target vs.
    the rest) weighted by ``alpha`` and non-target-class KD (the distribution over the other
    classes) weighted by ``beta``."""
    gt = F.one_hot(targets, student.shape[1]).bool()
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    # binary distributions [p(target), p(not target)]
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    tckd = F.kl_div(b_s.log(), b_t, reduction="batchmean")
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
    |f|^p, flattened and L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], p: float = 2.0
) -> torch.Tensor:
    """Attention transfer: mean squared distance of attention maps, averaged over the chosen
    stages. A student map of another spatial size is resized to the teacher's first."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return total / len(student)


def fitnet_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """FitNet hints (Romero et al. 2015): mean squared error between the (adapted) student
    features and the teacher's, averaged over the chosen stages."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        total = total + F.mse_loss(s, t)
    return total / len(student)
