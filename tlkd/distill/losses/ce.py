"""Cross-entropy on the labels: the student's own task term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CE(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.label_smoothing = cfg.label_smoothing

    def forward(self, student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student, targets, label_smoothing=self.label_smoothing)
