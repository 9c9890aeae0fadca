"""Hard-label distillation: the teacher's top class as a label."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hard_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's top class."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


class Hard(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()

    def forward(self, student, teacher, targets=None) -> torch.Tensor:
        return hard_loss(student, teacher)
