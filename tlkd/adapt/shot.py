"""SHOT (Liang et al., "Do We Really Need to Access the Source Data? Source Hypothesis Transfer
for Unsupervised Domain Adaptation", ICML 2020): source-free adaptation. The source model's
classifier (the "hypothesis") is frozen; the layers before it learn, from unlabelled target
images alone, information maximisation (confident yet diverse predictions) and
cross-entropy to pseudo-labels found by clustering the target features once per epoch.

The conventions (entropy with a 1e-5 inside the log, the diversity term, ``cls_par`` 0.3,
labels from prediction-weighted centroids over the whole target set in two rounds, cosine
distance on features extended by a constant 1, the class-size threshold) are those of the
official code, tim-learn/SHOT (object/image_target.py: train_target, obtain_label; the
digit version, digit/uda_digit.py, is the same without the threshold).

What differs: SHOT's source model is a backbone, a bottleneck (Linear + BatchNorm) and a
weight-normalised Linear classifier trained with label smoothing; a tlkd source is a plain
timm model. Here the hypothesis is the classifier's last Linear layer and the features are
its input (the pooled features, timm's pre-logits; after the hidden layers of a
``model.head``, which then train as SHOT's bottleneck does). Everything before it trains at
one learning rate (SHOT: backbone at 0.1x, bottleneck at 1x) with the run's optimizer and
schedule."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.adapt.objectives import DomainObjective
from tlkd.config.schema import AdaptConfig
from tlkd.distill.indexed import BatchIndices, IndexedLoader
from tlkd.engine import distributed
from tlkd.engine.inference import predict
from tlkd.engine.objectives import StepOutput
from tlkd.errors import TlkdError

EPSILON = 1e-5  # SHOT's epsilon inside the logs of both entropies
ROUNDS = 2  # centroid updates per labelling: from the soft predictions, then the labels


def entropy(probs: torch.Tensor, eps: float = EPSILON) -> torch.Tensor:
    """Per row ``-sum p log(p + eps)``."""
    return -(probs * torch.log(probs + eps)).sum(dim=-1)


def information_maximization(
    logits: torch.Tensor, diversity: bool = True, eps: float = EPSILON
) -> torch.Tensor:
    """SHOT's IM loss: the mean entropy of the rows' predictions (each confident), minus, with
    ``diversity``, the entropy of the batch's mean prediction (all classes used)."""
    probs = F.softmax(logits, dim=1)
    loss = entropy(probs, eps).mean()
    if diversity:
        loss = loss - entropy(probs.mean(dim=0), eps)
    return loss


def _distances(x: torch.Tensor, centroids: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":  # 1 - cosine similarity, as scipy's cdist
        return 1.0 - F.normalize(x, dim=1) @ F.normalize(centroids, dim=1).T
    return torch.cdist(x, centroids, compute_mode="donot_use_mm_for_euclid_dist")


def cluster_labels(
    features: torch.Tensor,
    logits: torch.Tensor,
    distance: str = "cosine",
    threshold: int = 0,
    rounds: int = ROUNDS,
) -> torch.Tensor:
    """SHOT's self-supervised pseudo-labels of a whole target set (float64 on the CPU): class
    centroids of the features weighted by the softmax predictions, each image labelled with
    its nearest centroid, then the centroids of those labels and the nearest again (``rounds``
    in all). A class keeps its centroid only when more than ``threshold`` images carry its
    label at that round (the first round: the classifier's argmax), as ``obtain_label`` in
    tim-learn/SHOT ``object/image_target.py`` at 07d0c71 (its earlier version and several
    forks count the classes once, before the first round). For ``cosine`` each feature vector
    gets a constant 1 appended and is L2-normalised first."""
    x = features.detach().double().cpu()
    probs = F.softmax(logits.detach().double().cpu(), dim=1)
    classes = probs.shape[1]
    if distance == "cosine":
        x = F.normalize(torch.cat([x, x.new_ones(len(x), 1)], dim=1), dim=1)
    labels, weights = probs.argmax(dim=1), probs
    for _ in range(rounds):
        centroids = weights.T @ x / (1e-8 + weights.sum(dim=0)[:, None])
        counts = torch.bincount(labels, minlength=classes)
        kept = (counts > threshold).nonzero().squeeze(1)
        if not len(kept):  # a threshold above every class: the largest one
            kept = counts.argmax().view(1)
        labels = kept[_distances(x, centroids[kept], distance).argmin(dim=1)]
        weights = F.one_hot(labels, classes).double()
    return labels


def hypothesis(model: nn.Module) -> nn.Module:
    """The layer SHOT keeps frozen: the classifier's last Linear layer (the classifier itself
    where it has none)."""
    head = model.get_classifier()
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else head


class SHOT(DomainObjective):
    """``adapt.weight`` x information maximisation + ``adapt.pseudo_weight`` x cross-entropy
    to the pseudo-labels, on target batches alone, with the hypothesis frozen. At the start
    of every epoch the pseudo-labels are clustered anew over all target images (eval views,
    the model in eval mode, as SHOT's obtain_label); they are checkpointed, so a resume
    inside an epoch keeps that epoch's labels."""

    title: ClassVar[str] = "SHOT"
    reads_target_set: ClassVar[bool] = True

    def __init__(
        self,
        cfg: AdaptConfig,
        source_val: Iterable | None,
        runtime: dict[str, Any],
        target_stats: Iterable | None,
        model: nn.Module,
    ):
        super().__init__(cfg, source_val, runtime)
        self.target_eval = target_stats  # eval views of all target images, in order
        self._net = (model, hypothesis(model))  # a tuple: not submodules of the objective
        for p in self._net[1].parameters():
            p.requires_grad_(False)
        self.slot = BatchIndices()
        self.labels = torch.zeros(0, dtype=torch.long)  # per target image (dataset order)
        self.labels_epoch = 0  # the epoch they were clustered for
        self.agreement: float | None = None  # % of labels equal to the classifier's argmax
        self._on_device: torch.Tensor | None = None

    @classmethod
    def uses_target_stats(cls, cfg: AdaptConfig) -> bool:
        return False

    @classmethod
    def plan_lines(cls, cfg: AdaptConfig, epochs: int) -> list[str]:
        im = "mean entropy" + (" - entropy of the batch-mean prediction" if cfg.diversity else "")
        lines = [
            "shot        source-free; classifier's last Linear frozen (SHOT's hypothesis); the "
            "layers before "
            f"it learn information maximisation ({im}, eps {EPSILON:g}) x {cfg.weight:g}"
            + (
                f" + pseudo-label cross-entropy x {cfg.pseudo_weight:g}"
                if cfg.pseudo_weight
                else " (adapt.pseudo_weight: 0, SHOT-IM)"
            )
        ]
        if cfg.pseudo_weight:
            lines.append(
                "pseudo      clustered anew at every epoch start over all target images (eval "
                f"views, eval mode): {ROUNDS} rounds of prediction-weighted centroids of the "
                f"classifier's input features, {cfg.distance} distance, classes with > "
                f"{cfg.cluster_threshold} images"
            )
        return lines

    @classmethod
    def summary_fields(cls, cfg: AdaptConfig) -> dict[str, Any]:
        return {
            "pseudo_weight": cfg.pseudo_weight,
            "diversity": cfg.diversity,
            "distance": cfg.distance,
            "cluster_threshold": cfg.cluster_threshold,
        }

    def wrap_train_loader(self, loader: Any) -> Any:
        """Each target batch's dataset indices into ``self.slot`` (the pseudo-labels' rows).
        The target images are unlabelled (all -1), so there are no labels to check the order
        against (``labels=None``): the indices are the train sampler's order, which the loader
        itself draws its batches from."""
        return IndexedLoader(loader, self.slot, None)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        super().start_epoch(epoch, epochs)
        if self.cfg.pseudo_weight and self.labels_epoch != epoch:
            self.labels, self.agreement = self._cluster()
            self.labels_epoch = epoch
            self._on_device = None

    @torch.no_grad()
    def _cluster(self) -> tuple[torch.Tensor, float]:
        """The pseudo-labels of all target images from the model as it is, and their
        agreement with its predictions (percent)."""
        if self.target_eval is None:
            raise TlkdError("SHOT needs eval views of the target images (reads_target_set)")
        model, layer = self._net
        feats: list[torch.Tensor] = []
        handle = layer.register_forward_hook(
            lambda _m, inputs, _out: feats.append(inputs[0].detach().float().flatten(1).cpu())
        )
        modes = {m: m.training for m in model.modules()}
        r = self.runtime
        try:
            logits, _ = predict(
                model, self.target_eval, r["device"], r["dtype"], r["channels_last"]
            )
        finally:
            handle.remove()
            for m, mode in modes.items():
                m.train(mode)
        features = torch.cat(feats)
        info = distributed.info()
        # each process holds the rows rank, rank + world, ...: gathered back in dataset order
        rows = torch.arange(info.rank, len(logits) * info.world, info.world)[: len(logits)]
        features, logits, rows = distributed.gather_cat(features, logits, rows)
        order = rows.argsort()
        features, logits = features[order], logits[order]
        labels = cluster_labels(features, logits, self.cfg.distance, self.cfg.cluster_threshold)
        agreement = 100.0 * (labels == logits.argmax(dim=1)).double().mean().item()
        return labels, agreement

    def train_metrics(self) -> dict[str, float | None]:
        """``train_pseudo_agree``: percent of target images whose pseudo-label this epoch is
        the classifier's own prediction at the epoch's start."""
        return {"train_pseudo_agree": self.agreement} if self.cfg.pseudo_weight else {}

    def forward(self, model, images, targets) -> StepOutput:
        logits = model(images)
        z = logits.float()
        im = information_maximization(z, self.cfg.diversity)
        loss = self.cfg.weight * im
        parts = {"im": im.detach()}
        if self.cfg.pseudo_weight:
            if self.slot.indices is None:
                raise TlkdError("SHOT's training batches carry no dataset indices")
            if self._on_device is None or self._on_device.device != z.device:
                self._on_device = self.labels.to(z.device)
            pseudo = F.cross_entropy(z, self._on_device[self.slot.indices.to(z.device)])
            loss = loss + self.cfg.pseudo_weight * pseudo
            parts["pseudo"] = pseudo.detach()
        return StepOutput(loss, logits, parts)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "labels_epoch": self.labels_epoch,
            "agreement": self.agreement,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.labels = state["labels"].cpu()
        self.labels_epoch = int(state["labels_epoch"])
        self.agreement = state["agreement"]
        self._on_device = None
