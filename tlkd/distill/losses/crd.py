"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020) as RepDistiller's
CRD (``crd/criterion.py``, ``crd/memory.py``, ``dataset/cifar100.py``): the student's and the
teacher's embeddings are contrasted with memory banks of every training sample's embedding.

Per batch, each sample is one positive (itself, the ``exact`` mode) and ``nce_k`` negatives drawn
from training samples of other classes. Both sides anchor: the teacher's embedding is scored
against the student bank and the student's against the teacher bank, ``exp(<v, m> / T) / Z``
with ``Z`` estimated once from the first batch; each side's NCE loss (Eq. 18) is summed. Then
the batch's rows of both banks move towards the new embeddings (momentum ``nce_m``).

The two ``Embed`` heads (linear + l2 normalisation) train with the student; the banks and ``Z``
are buffers of this term. Both live in the objective's checkpoint (a resume continues exactly),
not in the saved student. The batch's dataset indices come through a :class:`BatchIndices` slot
(tlkd/distill/indexed.py), which the distill recipe fills and hands over in
:meth:`CRD.attach_data`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.distill.indexed import BatchIndices
from tlkd.engine import distributed
from tlkd.errors import ConfigError, TlkdError

EPS = 1e-7  # in the NCE denominators, as the reference


class Embed(nn.Module):
    """Flattened features -> linear map to ``dim_out`` -> unit length (RepDistiller ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """The NCE loss of CRD's Eq. 18 for ``scores`` (B, 1 + K), the positive's first: with the
    uniform noise ``1 / n_data`` and ``c = K / n_data``, ``-(sum log(P_pos / (P_pos + c)) +
    sum log(c / (P_neg + c))) / B`` (RepDistiller ``ContrastLoss``)."""
    c = (scores.shape[1] - 1) / n_data
    positive = torch.log(scores[:, 0] / (scores[:, 0] + c + EPS))
    negative = torch.log(c / (scores[:, 1:] + c + EPS))
    return -(positive.sum() + negative.sum()) / scores.shape[0]


def bank_scores(
    bank: torch.Tensor, v: torch.Tensor, contrast_idx: torch.Tensor, dense: bool | None = None
) -> torch.Tensor:
    """``<bank[contrast_idx[b, j]], v[b]>`` (B, 1 + K), leaving ``bank`` free to be updated in
    place afterwards. ``dense``: one (B, n) product with a copy of the whole bank, then picked;
    else the rows gathered first, (B, 1 + K, d), as the reference does. None: whichever holds
    fewer numbers (dense while n x (d + B) <= B x (1 + K) x d: 14x fewer with CIFAR's 50,000)."""
    rows, dim = bank.shape
    batch, entries = contrast_idx.shape
    if dense is None:
        dense = rows * (dim + batch) <= batch * entries * dim
    if dense:
        return (v @ bank.T.clone()).gather(1, contrast_idx)
    return (bank[contrast_idx] @ v[:, :, None]).squeeze(2)


def _gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under torchrun: each tensor's rows of every rank, in rank order (shares may differ in
    length by the ragged last batch); alone: the tensors."""
    if not distributed.info().enabled:
        return tensors
    import torch.distributed as dist

    world = distributed.info().world
    rows = torch.tensor([len(tensors[0])], device=tensors[0].device)
    sizes = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(sizes, rows)
    counts = [int(s.item()) for s in sizes]
    out = []
    for t in tensors:
        padded = t.new_zeros((max(counts), *t.shape[1:]))
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]))
    return tuple(out)


class CRD(nn.Module):
    """CRD on one pair of layers (default: the pooled features, ``pre_logits``)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.feat_dim: int = cfg.feat_dim
        self.nce_k: int = cfg.nce_k
        self.nce_t: float = cfg.nce_t
        self.nce_m: float = cfg.nce_m
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.batch: BatchIndices | None = None
        self.n_data = 0

    def build(self, student_shapes, teacher_shapes, key: str) -> None:
        """The embedding heads, from the chosen layers' shapes (flattened)."""
        if len(student_shapes) != 1:
            raise ConfigError(key, "crd contrasts one pair of layers (default: pre_logits)")
        s_dim, t_dim = (math.prod(shapes[0][1:]) for shapes in (student_shapes, teacher_shapes))
        self.embed_s = Embed(s_dim, self.feat_dim)
        self.embed_t = Embed(t_dim, self.feat_dim)

    def attach_data(self, labels: torch.Tensor, batch: BatchIndices, key: str) -> None:
        """The training set (``labels``, one per sample) and the slot of each batch's indices:
        allocates the two banks (``len(labels)`` x ``feat_dim``, uniform in +-1/sqrt(feat_dim /
        3), as the reference) and the class tables the negatives are drawn from."""
        if self.embed_s is None:
            raise TlkdError("crd: build() must run before attach_data()")
        device = self.embed_s.linear.weight.device
        n, d = len(labels), self.feat_dim
        counts = torch.bincount(labels)
        if int((counts > 0).sum()) < 2:
            raise ConfigError(key, "crd draws negatives from other classes: needs two or more")
        bound = 1.0 / math.sqrt(d / 3)
        for name in ("memory_s", "memory_t"):  # memory_s: student embeddings (RepDistiller v1)
            self.register_buffer(name, (torch.rand(n, d) * 2 * bound - bound).to(device))
        self.register_buffer("z", torch.full((2,), -1.0, device=device))  # student, teacher side
        # samples sorted by class; class c's are order[start[c] : start[c] + count[c]]
        self.labels = labels.to(device)
        self.order = torch.argsort(labels, stable=True).to(device)
        self.counts = counts.to(device)
        self.starts = (torch.cumsum(counts, 0) - counts).to(device)
        self.batch, self.n_data = batch, n
        # which rows draw with replacement, decided here per class (no per-step mask if all or none)
        sizes = n - counts[counts > 0]  # other-class samples per class
        self.replace = (
            "all" if self.nce_k > sizes.max() else "none" if self.nce_k <= sizes.min() else "some"
        )
        self.pool_sizes = (int(sizes.min()), int(sizes.max()))

    def plan_line(self) -> str:
        """The banks and how the negatives are drawn, for the run's plan."""
        if not self.n_data:
            return f"{self.nce_k:,} negatives per sample from other classes"
        draw = {
            "all": f"with replacement (at most {self.pool_sizes[1]:,} other-class samples)",
            "some": "with replacement for classes with fewer other-class samples, else without",
            "none": "without replacement",
        }[self.replace]
        return (
            f"memory banks 2 x {self.n_data:,} x {self.feat_dim} (checkpointed with the "
            f"objective, not saved with the student); {self.nce_k:,} negatives per sample from "
            f"other classes, {draw}"
        )

    def negatives(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, nce_k) indices of samples of other classes than each of ``idx``'s, uniformly
        without replacement, or with replacement where nce_k exceeds the other-class samples
        (RepDistiller's CIFAR100InstanceSample, ``np.random.choice(..., replace=k > len)``)."""
        k, n = self.nce_k, self.n_data
        y = self.labels[idx]
        start, count = self.starts[y], self.counts[y]
        pool = n - count  # other-class samples per row

        def with_replacement(size: torch.Tensor) -> torch.Tensor:  # uniform to within 2^-50
            return torch.randint(2**62, (size.shape[0], k), device=idx.device) % size

        def without(size: torch.Tensor) -> torch.Tensor:  # the k smallest of random keys
            keys = torch.rand(size.shape[0], n, device=idx.device)
            keys.masked_fill_(torch.arange(n, device=idx.device) >= size, 2.0)
            return keys.topk(k, dim=1, largest=False, sorted=False).indices

        if self.replace == "all":
            pos = with_replacement(pool[:, None])
        elif self.replace == "none":
            pos = without(pool[:, None])
        else:
            pos = torch.empty(len(idx), k, dtype=torch.long, device=idx.device)
            replace = pool < k
            pos[replace] = with_replacement(pool[replace, None])
            pos[~replace] = without(pool[~replace, None])
        # position in the pool -> position in the class-sorted order (skip the own class)
        pos = pos + (pos >= start[:, None]) * count[:, None]
        return self.order[pos]

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        if self.batch is None or self.batch.indices is None:
            raise TlkdError(
                "crd needs each batch's dataset indices (tlkd distill provides them): "
                "call attach_data() and train through its IndexedLoader"
            )
        idx = self.batch.indices.to(self.memory_s.device, non_blocking=True)
        if len(idx) != len(student[0]):
            raise TlkdError("crd: batch indices out of step with the batch")
        contrast = torch.cat([idx[:, None], self.negatives(idx)], dim=1)
        return self.contrast(student[0], teacher[0], idx, contrast)

    def contrast(
        self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor, contrast_idx: torch.Tensor
    ) -> torch.Tensor:
        """The loss of one batch given its sample indices ``idx`` (B,) and ``contrast_idx``
        (B, 1 + K: the positive, then the negatives); then the momentum update of both banks
        at ``idx``. In float32 (scores reach exp(1 / nce_t))."""
        with torch.autocast(f_s.device.type, enabled=False):
            v_s = self.embed_s(f_s.float())
            v_t = self.embed_t(f_t.float())
            # bank rows are buffers, not trained: each anchor against the other side's bank
            scores_s = torch.exp(bank_scores(self.memory_t, v_s, contrast_idx) / self.nce_t)
            scores_t = torch.exp(bank_scores(self.memory_s, v_t, contrast_idx) / self.nce_t)
            with torch.no_grad():
                # Z: mean score x n_data, set once, from the first batch (every rank's rows)
                sums = torch.stack([scores_s.sum(), scores_t.sum()])
                count = torch.tensor(float(scores_s.numel()), device=sums.device)
                if distributed.info().enabled:
                    import torch.distributed as dist

                    both = torch.cat([sums, count[None]])
                    dist.all_reduce(both)
                    sums, count = both[:2], both[2]
                # both from one batch, and not from a non-finite one (train.skip_nonfinite
                # skips it; a NaN Z would stay): then from the next
                z = sums / count * self.n_data
                self.z.copy_(torch.where((self.z < 0) & torch.isfinite(z).all(), z, self.z))
            loss = nce_loss(scores_s / self.z[0], self.n_data) + nce_loss(
                scores_t / self.z[1], self.n_data
            )
            self._update(idx, v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def _update(self, idx: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        """Bank rows at ``idx`` <- normalise(m x row + (1 - m) x embedding); under torchrun
        with every rank's rows, so the banks stay the same on every rank. A sample whose
        embedding is not finite (a step train.skip_nonfinite skips) keeps its rows: a NaN row
        would be drawn as a negative of other samples and make every later loss NaN."""
        idx, v_s, v_t = _gather_rows(idx, v_s, v_t)
        finite = (torch.isfinite(v_s).all(dim=1) & torch.isfinite(v_t).all(dim=1))[:, None]
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            old = bank[idx]
            rows = F.normalize(old * self.nce_m + v * (1 - self.nce_m), dim=1)
            bank.index_copy_(0, idx, torch.where(finite, rows, old))
