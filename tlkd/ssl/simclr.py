"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020): two random views of every image, a projection head, and the
NT-Xent loss that pulls each view towards its partner and away from the other 2N-2 views.
timm and torch have no contrastive loss, hence this module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.config.schema import PretrainConfig
from tlkd.engine.objectives import Objective, StepOutput
from tlkd.ssl.knn import knn_top1


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``z`` = [views 1; views 2] (2N rows): row i's positive is row i +- N."""
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0] // 2
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own negative
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)


class SimCLR(Objective):
    """The backbone (a timm model without classifier) plus a projection head; the head is
    trained and checkpointed but not saved in model.safetensors (only the backbone is)."""

    def __init__(self, features: int, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.projector = nn.Sequential(
            nn.Linear(features, cfg.proj_hidden),
            nn.BatchNorm1d(cfg.proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden, cfg.proj_dim),
        )

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        feats = model(images)
        loss = nt_xent(self.projector(feats.float()), self.cfg.temperature)
        return StepOutput(loss, feats)

    def val_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        """The backbone's features scored by leave-one-out k-NN on the labelled val set."""
        return {"loss": None, "top1": knn_top1(outputs, targets, self.cfg.knn_k), "top5": None}


class TwoViews:
    """Batches of two random views of the same images, stacked ([views 1; views 2]), labels
    -1 (unused). Wraps an in-memory loader (views drawn twice) or a loader that already
    yields both views so (tlkd.data.pipeline.extra_loader with ``two_views``)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.sampler, self.generator = loader.sampler, loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if hasattr(self.loader, "batches"):  # in memory
            for idx in self.loader.batches():
                x = torch.cat([self.loader.views(idx), self.loader.views(idx)])
                yield x, torch.full((len(x),), -1, dtype=torch.long)
        else:
            for x, _ in self.loader:
                yield x, torch.full((len(x),), -1, dtype=torch.long)
