"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020): two random views of every image, a projection head, and the
NT-Xent loss that pulls each view towards its partner and away from the other 2N-2 views.
timm and torch have no contrastive loss, hence this module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tlkd.config.schema import PretrainConfig
from tlkd.engine import distributed
from tlkd.engine.objectives import Objective, StepOutput
from tlkd.ssl.knn import knn_top1


class _GatherRows(torch.autograd.Function):
    """Every process's rows, in rank order (``counts`` of them). Backward: each process gets
    the gradient of its own rows summed over the processes, the gradient of the gather (as
    TF's cross-replica all-reduce in SimCLR's code gives), so with DistributedDataParallel's
    average the update is the one a single process makes on the global batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        ctx.start, ctx.count = sum(counts[:rank]), len(x)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.count], None, None


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(all processes' rows of ``x`` in rank order, the index of this process's first row);
    ``x`` itself and 0 in a single process."""
    if not distributed.info().enabled:
        return x, 0
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    counts, rank = [int(s) for s in sizes], dist.get_rank()
    return _GatherRows.apply(x, counts, rank), sum(counts[:rank])


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent as SimCLR's code computes it (tf2/objective.py, add_contrastive_loss), for
    ``z`` = [views 1; views 2] (2N rows, row i's partner is row i + N): each view of a pair
    is scored against its partner among the other 2N - 2 views as negatives, in both
    directions, and the two cross-entropies are summed: the mean over pairs of
    loss(a->b) + loss(b->a), twice the mean over the 2N rows. Under torchrun the candidates
    are every process's views (gathered, gradients flowing back to their processes), the
    anchors this process's own."""
    h = F.normalize(z.float(), dim=1)
    h1, h2 = h.chunk(2)
    n = len(h1)
    both, start = gather_rows(torch.cat([h1, h2], dim=1))
    h1_all, h2_all = both.split(h.shape[1], dim=1)
    labels = torch.arange(start, start + n, device=h.device)
    self_mask = torch.zeros(n, len(both), dtype=torch.bool, device=h.device)
    self_mask[torch.arange(n, device=h.device), labels] = True  # a view is not its own negative
    aa = (h1 @ h1_all.T / temperature).masked_fill(self_mask, float("-inf"))
    bb = (h2 @ h2_all.T / temperature).masked_fill(self_mask, float("-inf"))
    ab = h1 @ h2_all.T / temperature
    ba = h2 @ h1_all.T / temperature
    loss_a = F.cross_entropy(torch.cat([ab, aa], dim=1), labels, reduction="none")
    loss_b = F.cross_entropy(torch.cat([ba, bb], dim=1), labels, reduction="none")
    return (loss_a + loss_b).mean()


class SimCLR(Objective):
    """The backbone (a timm model without classifier) plus a projection head; the head is
    trained and checkpointed but not saved in model.safetensors (only the backbone is). The
    loss is SimCLR's code's NT-Xent (:func:`nt_xent`)."""

    def __init__(self, features: int, cfg: PretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.projector = nn.Sequential(
            nn.Linear(features, cfg.proj_hidden),
            nn.BatchNorm1d(cfg.proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden, cfg.proj_dim),
        )

    @classmethod
    def plan_line(cls, cfg: PretrainConfig, features: int) -> str:
        return (
            f"projection {features}->{cfg.proj_hidden}->{cfg.proj_dim}, "
            f"temperature {cfg.temperature:g}"
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
