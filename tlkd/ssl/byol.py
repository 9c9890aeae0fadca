"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020): an online network (the
backbone, a projector and a predictor) learns to predict, from one view of an image, a target
network's projection of the other view. The target (a copy of the backbone and the projector)
is not trained: after every optimizer step it moves towards the online network by an
exponential moving average whose rate tau rises from ``tau_base`` to 1 along a cosine. The
conventions are those of the official code (google-deepmind/deepmind-research, byol/)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.config.schema import PretrainConfig
from tlkd.engine.objectives import Objective, StepOutput
from tlkd.ssl.knn import knn_top1


def mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    """BYOL's projector and predictor: linear, BatchNorm, ReLU, linear."""
    return nn.Sequential(
        nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out),
    )  # fmt: skip


def target_tau(k: int, total: int, tau_base: float) -> float:
    """The EMA rate after optimizer step ``k`` (0-based) of ``total``:
    1 - (1 - tau_base) (cos(pi k / total) + 1) / 2, from tau_base at k = 0 towards 1."""
    k = min(k, total)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / max(total, 1)) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, parameter by parameter (buffers such as
    BatchNorm statistics are the target's own, from its forward passes)."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - tau)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetric loss for predictions ``p`` and target projections ``z``, both
    [views 1; views 2]: the mean over images of (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1)),
    which is the squared distance of the normalised vectors; no gradient reaches ``z``."""
    p1, p2 = F.normalize(p.float(), dim=1).chunk(2)
    z1, z2 = F.normalize(z.detach().float(), dim=1).chunk(2)
    return (2 - 2 * (p1 * z2).sum(1) + 2 - 2 * (p2 * z1).sum(1)).mean()


class BYOL(Objective):
    """The backbone (a timm model without classifier) with a projector and a predictor, and
    the target network (copies of the backbone and the projector, made by :meth:`attach`).
    The heads and the target are trained or averaged and checkpointed, not saved in
    model.safetensors (only the backbone is). Each view goes through the networks on its own,
    so BatchNorm normalises each view with its own statistics, as the official code does."""

    def __init__(self, features: int, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.projector = mlp(features, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.target_backbone: nn.Module | None = None
        self.tau = cfg.tau_base  # the last update's rate (a plain value: logged, not saved)

    @classmethod
    def plan_line(cls, cfg: PretrainConfig, features: int) -> str:
        return (
            f"projection {features}->{cfg.proj_hidden}->{cfg.proj_dim}, prediction "
            f"{cfg.proj_dim}->{cfg.pred_hidden}->{cfg.proj_dim}, target network EMA "
            f"tau {cfg.tau_base:g}->1 (cosine over the run's updates)"
        )

    def attach(self, model: nn.Module) -> None:
        """The target backbone: a copy of the model as it starts (the checkpoint then holds
        it, so a resume continues its average)."""
        self.target_backbone = copy.deepcopy(model).requires_grad_(False)

    def after_update(self, model: nn.Module, update: int, updates: int) -> None:
        """The target's EMA step after optimizer step ``update`` (1-based): as the official
        code, with the step's 0-based index and the online weights just updated."""
        self.tau = target_tau(update - 1, updates, self.cfg.tau_base)
        ema_update(self.target_backbone, model, self.tau)
        ema_update(self.target_projector, self.projector, self.tau)

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        if self.target_backbone is None:
            raise RuntimeError("BYOL.attach(model) makes the target network before training")
        views = images.chunk(2)
        feats = [model(v) for v in views]
        p = torch.cat([self.predictor(self.projector(f.float())) for f in feats])
        with torch.no_grad():
            z = torch.cat([self.target_projector(self.target_backbone(v).float()) for v in views])
        return StepOutput(byol_loss(p, z), torch.cat(feats))

    def train_metrics(self) -> dict[str, float | None]:
        return {"train_tau": self.tau}  # the target EMA rate of the last update

    def val_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """The backbone's features scored by leave-one-out k-NN on the labelled val set."""
        return {"loss": None, "top1": knn_top1(outputs, targets, self.cfg.knn_k), "top5": None}
