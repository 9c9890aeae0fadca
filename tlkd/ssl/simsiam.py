"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021): one
network (the backbone and a projector) sees both views; a predictor on one view's projection
matches the other view's projection, on which the gradient is stopped. No negatives, no
momentum encoder. The conventions are those of the official code (facebookresearch/simsiam,
simsiam/builder.py and main_simsiam.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.config.schema import PretrainConfig
from tlkd.engine.objectives import Objective, StepOutput
from tlkd.ssl.knn import knn_top1


def projector(width: int, hidden: int, out: int, layers: int) -> nn.Sequential:
    """SimSiam's projection MLP: ``layers`` linear layers, each followed by BatchNorm, ReLU
    after all but the last; the output BatchNorm has no affine parameters. The linear layers
    have no bias (BatchNorm removes it: the official code freezes the last one's). 3 layers on
    ImageNet, 2 in the paper's CIFAR experiments."""
    dims = [width] + [hidden] * (layers - 1) + [out]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = i == layers - 1
        mods += [nn.Linear(a, b, bias=False), nn.BatchNorm1d(b, affine=not last)]
        if not last:
            mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


def predictor(dim: int, hidden: int) -> nn.Sequential:
    """SimSiam's prediction MLP, a bottleneck: linear, BatchNorm, ReLU, linear."""
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, dim),
    )  # fmt: skip


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetric loss for predictions ``p`` and projections ``z``, both
    [views 1; views 2]: D(p1, z2) / 2 + D(p2, z1) / 2 with D(p, z) = -cos(p, stopgrad(z))
    averaged over images; between -1 and 1, no gradient reaches ``z``."""
    p1, p2 = p.float().chunk(2)
    z1, z2 = z.detach().float().chunk(2)
    return -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2


class SimSiam(Objective):
    """The backbone (a timm model without classifier) with a projector and a predictor; the
    heads are trained and checkpointed but not saved in model.safetensors (only the backbone
    is). Each view goes through the network on its own, so BatchNorm normalises each view with
    its own statistics, as the official code does. With ``fix_pred_lr`` the predictor keeps
    the initial learning rate (main_simsiam.py --fix-pred-lr)."""

    def __init__(self, features: int, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.projector = projector(features, cfg.proj_hidden, cfg.proj_dim, cfg.proj_layers)
        self.predictor = predictor(cfg.proj_dim, cfg.pred_hidden)

    @classmethod
    def plan_line(cls, cfg: PretrainConfig, features: int) -> str:
        dims = "->".join(map(str, [features] + [cfg.proj_hidden] * (cfg.proj_layers - 1)))
        lr = "fixed" if cfg.fix_pred_lr else "scheduled"
        return (
            f"projection {dims}->{cfg.proj_dim}, prediction {cfg.proj_dim}->"
            f"{cfg.pred_hidden}->{cfg.proj_dim} ({lr} lr), stop-gradient on the projections"
        )

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.cfg.fix_pred_lr:
            return super().param_groups()
        return [
            {"params": list(self.projector.parameters())},
            {"params": list(self.predictor.parameters()), "fixed_lr": True},
        ]

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        feats = [model(v) for v in images.chunk(2)]
        z = [self.projector(f.float()) for f in feats]
        p = torch.cat([self.predictor(x) for x in z])
        return StepOutput(simsiam_loss(p, torch.cat(z)), torch.cat(feats))

    def val_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """The backbone's features scored by leave-one-out k-NN on the labelled val set."""
        return {"loss": None, "top1": knn_top1(outputs, targets, self.cfg.knn_k), "top5": None}
