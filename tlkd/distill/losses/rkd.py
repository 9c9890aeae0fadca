"""Relational knowledge distillation (Park et al. 2019): distances and angles in a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12  # floor of a squared distance before its square root (as the reference)


def relations(embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's relations of ``embedding`` (N rows, flattened): the N x N Euclidean
    distances divided by their mean over distinct pairs (the diagonal is 0), and the
    N x N x N cosines ``[i, j, k]`` of the angle at row i between rows j and k (0 where
    j or k is i)."""
    e = embedding.flatten(1)
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # [i, j] = e_j - e_i
    off = ~torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    dist = diff.pow(2).sum(dim=2).clamp_min(EPS).sqrt() * off
    dist = dist / dist[off].mean()
    unit = F.normalize(diff, dim=2)
    angles = torch.bmm(unit, unit.transpose(1, 2))
    return dist, angles


def rkd_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    parts: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """RKD as RepDistiller's ``RKDLoss`` (``distiller_zoo/RKD.py``): Huber (smooth L1, mean
    over all entries) between the student's and the teacher's distance relations, times
    ``distance_weight``, plus the same for the angle relations, times ``angle_weight``;
    the teacher's relations carry no gradient. Several pairs are SUMMED (one by default: the
    embedding, as the reference). A batch of one row has no relations: 0. In float32, also
    under autocast (bf16/fp16 products would swamp the relations' small differences).
    ``parts``, if given, receives the two weighted terms (detached), for the metrics."""
    dtype = torch.promote_types(student[0].dtype, torch.float32)  # float64 stays
    distance = angle = student[0].new_zeros((), dtype=dtype)
    with torch.autocast(student[0].device.type, enabled=False):
        for s, t in zip(student, teacher, strict=True):
            s, t = s.to(dtype), t.to(dtype)
            if s.shape[0] < 2:
                distance = distance + 0.0 * s.sum()
                continue
            s_dist, s_angles = relations(s)
            with torch.no_grad():
                t_dist, t_angles = relations(t)
            distance = distance + distance_weight * F.smooth_l1_loss(s_dist, t_dist)
            angle = angle + angle_weight * F.smooth_l1_loss(s_angles, t_angles)
    if parts is not None:
        parts.update(distance=distance.detach(), angle=angle.detach())
    return distance + angle


class RKD(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.distance_weight = cfg.distance_weight
        self.angle_weight = cfg.angle_weight
        self.parts: dict[str, torch.Tensor] = {}  # the last batch's terms, logged apart

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        self.parts = {}
        return rkd_loss(student, teacher, self.distance_weight, self.angle_weight, self.parts)
