"""Probabilistic knowledge transfer (Passalis & Tefas 2018)."""

from __future__ import annotations

import torch
from torch import nn

EPS = 1e-7  # the reference's epsilon: in the norms and in the logarithm


def conditional_probabilities(embedding: torch.Tensor) -> torch.Tensor:
    """PKT's N x N conditional probabilities of a batch (rows flattened): the cosine kernel
    ``(cos + 1) / 2`` of every pair of rows (the norm plus ``EPS``), each row divided by its
    sum (the diagonal, a row with itself, included)."""
    e = embedding.flatten(1)
    e = e / (e.norm(dim=1, keepdim=True) + EPS)
    kernel = (e @ e.T + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """PKT as RepDistiller's ``PKT`` (``distiller_zoo/PKT.py``): the KL divergence of the
    student's conditional probabilities from the teacher's, ``p_t * log((p_t + eps) /
    (p_s + eps))`` MEANED over all N x N entries (not per row). Several pairs are SUMMED
    (one by default: the embedding, as the reference). In float32, also under autocast: the
    probabilities are about 1/N each and their log-ratios tiny, far below bf16's resolution."""
    dtype = torch.promote_types(student[0].dtype, torch.float32)  # float64 stays
    total = student[0].new_zeros((), dtype=dtype)
    with torch.autocast(student[0].device.type, enabled=False):
        for s, t in zip(student, teacher, strict=True):
            p_s = conditional_probabilities(s.to(dtype))
            with torch.no_grad():
                p_t = conditional_probabilities(t.to(dtype))
            total = total + (p_t * (torch.log(p_t + EPS) - torch.log(p_s + EPS))).mean()
    return total


class PKT(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        return pkt_loss(student, teacher)
