"""Gradient reversal (Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation",
ICML 2015): identity forward, gradient times -lambda backward. torch and timm have no such
layer, so it is written here; it is a few lines of autograd."""

from __future__ import annotations

import math

import torch
from torch import nn


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def reverse_gradient(x: torch.Tensor, lam: float) -> torch.Tensor:
    return _Reverse.apply(x, lam)


GAMMA = 10.0  # Ganin & Lempitsky's gamma (section 5.2 of the paper)


def dann_lambda(step: int, total: int, gamma: float = GAMMA) -> float:
    """Ganin's schedule per training iteration: ``2 / (1 + exp(-gamma p)) - 1`` with
    ``p = step / total`` the progress, 0 at the first adapting step (``step`` 0, lambda 0)
    and rising towards 1. It is tllib's WarmStartGradientReverseLayer (lo 0, hi 1, alpha
    ``gamma``, max_iters ``total``), whose iteration count starts at 0 and grows by one per
    step."""
    p = step / max(total, 1)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class DomainDiscriminator(nn.Module):
    """Features -> source (0) / target (1) logit, through gradient reversal. With
    ``batch_norm`` each hidden layer is Linear, BatchNorm1d, ReLU (tllib's
    DomainDiscriminator with its default batch_norm=True, as its CDAN example trains it);
    without, Linear and ReLU."""

    def __init__(self, features: int, hidden: int, batch_norm: bool = False) -> None:
        super().__init__()

        def block(width: int) -> list[nn.Module]:
            norm = [nn.BatchNorm1d(hidden)] if batch_norm else []
            return [nn.Linear(width, hidden), *norm, nn.ReLU(inplace=True)]

        self.net = nn.Sequential(*block(features), *block(hidden), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, lam: float) -> torch.Tensor:
        return self.net(reverse_gradient(features, lam)).squeeze(1)
