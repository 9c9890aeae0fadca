"""A k-NN monitor of representation quality: each labelled val image is classified by the
similarity-weighted vote of its k nearest other val images (cosine similarity, weights
exp(sim / 0.07) as in Wu et al. 2018), leave-one-out, so no trained classifier is needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_top1(features: torch.Tensor, labels: torch.Tensor, k: int = 20, chunk: int = 1024) -> float:
    """Leave-one-out weighted k-NN top-1 (percent) of ``features`` with ``labels``."""
    n = len(labels)
    if n < 2:
        return 0.0
    f = F.normalize(features.float().flatten(1), dim=1)
    classes = int(labels.max()) + 1
    k = min(k, n - 1)
    correct = 0
    for start in range(0, n, chunk):
        sim = f[start : start + chunk] @ f.T
        rows = torch.arange(start, min(start + chunk, n))
        sim[torch.arange(len(rows)), rows] = -2.0  # never its own neighbour
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(rows), classes)
        votes.scatter_add_(1, labels[idx], (top / 0.07).exp())
        correct += (votes.argmax(1) == labels[rows]).sum().item()
    return 100.0 * correct / n
