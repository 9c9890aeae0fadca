"""What a batch of labelled source and unlabelled target images (target -1) costs, per
adaptation method (registered in tlkd/adapt/registry.py). All share the source
cross-entropy and the per-epoch domain metrics; each class says how a run is wired for it
(``trains_on_target``, ``uses_target_stats``, ``plan_lines``, ``summary_fields``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.adapt.adabn import reestimate_bn
from tlkd.adapt.grl import DomainDiscriminator, dann_lambda
from tlkd.config.schema import AdaptConfig
from tlkd.engine.distributed import gather_cat
from tlkd.engine.inference import classification_metrics, predict
from tlkd.engine.objectives import Objective, StepOutput
from tlkd.models.head import feature_width


class DomainObjective(Objective):
    """Source cross-entropy; scores a labelled source val set at every validation.

    With ``target_stats`` (eval-transformed target images), BatchNorm statistics are
    re-estimated on the target before every validation (AdaBN); the source val set is scored
    first, with the statistics training left (the source's). With ``adapt.target_bn`` each
    batch's source and target images go through the model separately, so BatchNorm
    normalises the target with target statistics in training too (domain-specific batch
    normalisation, as in Chang et al. 2019: a shared network whose normalisation is per
    domain). Without it (the default) both domains share one batch and its statistics, as in
    the methods' papers."""

    trains_on_target: ClassVar[bool] = True  # target images join every training batch
    # the objective is handed eval views of all target images, in order (``target_stats``),
    # to read as it likes (e.g. SHOT's clustering); without ``uses_target_stats`` no BatchNorm
    # re-estimation follows from it
    reads_target_set: ClassVar[bool] = False
    # BatchNorm normalises each val batch with its own statistics: data.val and
    # adapt.source_val are then read in a fixed random order (tlkd.data.datasets.shuffled),
    # not their folders' class-by-class one
    val_batch_stats: ClassVar[bool] = False
    title: ClassVar[str] = ""  # the method's name in plan lines

    def __init__(
        self,
        cfg: AdaptConfig,
        source_val: Iterable | None,
        runtime: dict[str, Any],
        target_stats: Iterable | None = None,
        model: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.source_val = source_val
        self.runtime = runtime  # device, dtype, channels_last
        self.target_stats = target_stats
        self.epoch, self.epochs = 1, 1
        self.step, self.steps = 1, 1
        self._source_scores: dict[str, float] = {}

    @classmethod
    def uses_target_stats(cls, cfg: AdaptConfig) -> bool:
        """Whether BatchNorm statistics are re-estimated on the target before validation."""
        return bool(cfg.target_bn)

    @classmethod
    def online(cls, cfg: AdaptConfig) -> bool:
        """Test-time adaptation on the val stream (a source-free method): the training batches
        are data.val's, in its order, and the objective scores the predictions it made while
        adapting (``val_scores``); data.unlabeled is not needed."""
        return False

    def wrap_train_loader(self, loader: Any) -> Any:
        """The training loader as this objective reads it (e.g. with each batch's dataset
        indices, for per-image state)."""
        return loader

    @classmethod
    def plan_lines(cls, cfg: AdaptConfig, epochs: int) -> list[str]:
        return [
            "batchnorm   "
            + (
                "per domain in training (adapt.target_bn: true, the per-domain-BN variant); "
                "re-estimated on the target before every validation"
                if cfg.target_bn
                else "one batch of source and target images, shared statistics "
                f"(plain {cls.title}; adapt.target_bn: false)"
            )
        ]

    @classmethod
    def summary_fields(cls, cfg: AdaptConfig) -> dict[str, Any]:
        return {"target_bn": cfg.target_bn}

    def run(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The model's logits for the batch, rows in the batch's order; per domain when
        ``adapt.target_bn`` (a domain with a single image joins the other's batch)."""
        tgt = targets < 0
        n_tgt = int(tgt.sum())
        if not self.cfg.target_bn or n_tgt < 2 or len(targets) - n_tgt < 2:
            return model(images)
        order = torch.cat([(~tgt).nonzero(), tgt.nonzero()]).squeeze(1)
        out = torch.cat([model(images[~tgt]), model(images[tgt])])
        return out[order.argsort()]

    def before_val(self, model: nn.Module) -> None:
        """The source val set scored with the BatchNorm statistics of training (the source's),
        then, with ``target_stats``, the statistics re-estimated on the target for the target
        val set and the saved model."""
        r = self.runtime
        if self.source_val is not None:
            logits, targets = gather_cat(
                *predict(model, self.source_val, r["device"], r["dtype"], r["channels_last"])
            )
            m = classification_metrics(logits, targets)
            self._source_scores = {"source_val_loss": m["loss"], "source_val_top1": m["top1"]}
        if self.target_stats is not None:
            reestimate_bn(model, self.target_stats, r["device"], r["dtype"], r["channels_last"])

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = epoch, epochs

    def start_step(self, step: int, steps: int) -> None:
        self.step, self.steps = step, steps

    @property
    def adapting(self) -> bool:
        """Past the warm-up epochs: the target term is on."""
        return self.epoch > (self.cfg.warmup_epochs or 0)

    @property
    def progress(self) -> tuple[int, int]:
        """(steps of adaptation done before this one, steps of adaptation in all): the
        position in the training after the warm-up epochs, from the epoch and step numbers,
        so a resumed run continues the count exactly."""
        warm = self.cfg.warmup_epochs or 0
        done = (self.epoch - warm - 1) * self.steps + self.step - 1
        return max(done, 0), max(self.epochs - warm, 1) * self.steps

    def extra_val(self, model: nn.Module) -> dict[str, float]:
        scores, self._source_scores = self._source_scores, {}
        return scores


def _source_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    src = targets >= 0
    return F.cross_entropy(logits[src].float(), targets[src])


class AdaBN(DomainObjective):
    """Trains on the source alone; before each validation the BatchNorm statistics are
    re-estimated on the target images, so the saved model carries the target's."""

    trains_on_target = False

    @classmethod
    def uses_target_stats(cls, cfg: AdaptConfig) -> bool:
        return True

    @classmethod
    def plan_lines(cls, cfg: AdaptConfig, epochs: int) -> list[str]:
        return []

    @classmethod
    def summary_fields(cls, cfg: AdaptConfig) -> dict[str, Any]:
        return {}

    def forward(self, model, images, targets) -> StepOutput:
        logits = model(images)
        return StepOutput(_source_ce(logits, targets), logits)


def pseudo_labels(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, keep): the most probable class of each row, kept where its probability is at
    least ``threshold``."""
    conf, labels = probs.max(dim=1)
    return labels, conf >= threshold


class PseudoLabel(DomainObjective):
    """Self-training (Lee 2013): target images whose prediction is confident enough count as
    labelled with it. The target term is averaged over all target rows, so it grows with the
    share of confident ones."""

    title = "pseudo-labelling"

    def forward(self, model, images, targets) -> StepOutput:
        logits = self.run(model, images, targets)
        ce = _source_ce(logits, targets)
        tgt = targets < 0
        if not self.adapting or not tgt.any():
            return StepOutput(ce, logits, {"ce": ce.detach()})
        t_logits = logits[tgt].float()
        with torch.no_grad():
            labels, keep = pseudo_labels(t_logits.softmax(dim=1), self.cfg.threshold)
        per_row = F.cross_entropy(t_logits, labels, reduction="none")
        pseudo = (per_row * keep).sum() / tgt.sum()
        total = ce + self.cfg.weight * pseudo
        return StepOutput(total, logits, {"ce": ce.detach(), "pseudo": pseudo.detach()})


def certainty_weights(probs: torch.Tensor) -> torch.Tensor:
    """Per row ``1 + exp(-H(p))``, H the entropy of the row's probabilities (a 1e-5 inside
    the log, as tllib's ``entropy``), scaled to sum to the number of rows: confident rows
    count more (CDAN+E's entropy conditioning, MCC's sample weights). No gradient."""
    probs = probs.detach()
    h = -(probs * torch.log(probs + 1e-5)).sum(dim=1)
    w = 1.0 + torch.exp(-h)
    return w * (len(w) / w.sum())


def domain_loss(source_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's binary cross-entropy, source labelled 0 and target 1, each domain's
    mean weighted 1/2 (tllib's DomainAdversarialLoss; the mean over the batch when the
    domains are equally many, as in Ganin's batches)."""
    s = F.binary_cross_entropy_with_logits(source_logits, torch.zeros_like(source_logits))
    t = F.binary_cross_entropy_with_logits(target_logits, torch.ones_like(target_logits))
    return 0.5 * (s + t)


class DANN(DomainObjective):
    """Domain-adversarial training (Ganin & Lempitsky 2015): a discriminator tells source from
    target on the classifier's input features, through gradient reversal whose lambda follows
    Ganin's schedule per training step, so the features learn to hide the domain. The
    discriminator is trained and checkpointed with the model but not saved in
    model.safetensors."""

    title = "DANN"

    def __init__(
        self,
        cfg: AdaptConfig,
        source_val: Iterable | None,
        runtime: dict[str, Any],
        target_stats: Iterable | None,
        model: nn.Module,
        features: int | None = None,  # the classifier's input width; default: the model's
    ):
        super().__init__(cfg, source_val, runtime, target_stats)
        features = features if features is not None else feature_width(model)
        self.discriminator = self.make_discriminator(features, model)
        self._feats: list[torch.Tensor] = []
        # the classifier's input is the pooled feature vector of any timm model
        model.get_classifier().register_forward_hook(
            lambda m, inputs, _out: self._feats.append(inputs[0]) if m.training else None
        )

    def make_discriminator(self, features: int, model: nn.Module) -> nn.Module:
        """The domain discriminator on the classifier's ``features``-wide input."""
        return DomainDiscriminator(features, self.cfg.hidden)

    def logits_and_features(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's logits and the classifier's input features, rows in the batch's
        order."""
        self._feats.clear()
        logits = self.run(model, images, targets)
        feats = torch.cat(self._feats)
        if len(self._feats) == 2:  # per domain: source rows first, as run() ordered them
            tgt = targets < 0
            feats = feats[torch.cat([(~tgt).nonzero(), tgt.nonzero()]).squeeze(1).argsort()]
        return logits, feats

    @classmethod
    def plan_lines(cls, cfg: AdaptConfig, epochs: int) -> list[str]:
        span = max(epochs - cfg.warmup_epochs, 0)
        return [
            *super().plan_lines(cfg, epochs),
            "grl         Ganin's lambda = 2/(1+exp(-10 p)) - 1 per step, p from 0 to 1 over "
            f"the {span} epochs after {cfg.warmup_epochs} warm-up",
        ]

    def reversal(self) -> float:
        """The gradient reversal's lambda at this adapting step: Ganin's schedule."""
        return dann_lambda(*self.progress)

    def domain_term(
        self, feats: torch.Tensor, logits: torch.Tensor, tgt: torch.Tensor, lam: float
    ) -> torch.Tensor:
        """The discriminator's loss on the batch (``tgt``: its target rows) through gradient
        reversal with ``lam``."""
        d_logits = self.discriminator(feats.float(), lam)
        return domain_loss(d_logits[~tgt], d_logits[tgt])

    def forward(self, model, images, targets) -> StepOutput:
        logits, feats = self.logits_and_features(model, images, targets)
        ce = _source_ce(logits, targets)
        tgt = targets < 0
        if not tgt.any() or tgt.all():
            return StepOutput(ce, logits, {"ce": ce.detach()})
        if not self.adapting:
            # warm-up: the source alone, but the discriminator still runs (lambda 0, its loss
            # counted 0 times), so every parameter is in the graph and gets a (zero) gradient,
            # as DistributedDataParallel (no find_unused_parameters) needs; the loss, the
            # model's gradients and the metrics are the source cross-entropy's, and
            # before_update drops the zero gradients so the optimizer leaves it as before
            d_loss = self.domain_term(feats, logits, tgt, 0.0)
            return StepOutput(ce + 0.0 * d_loss, logits, {"ce": ce.detach()})
        d_loss = self.domain_term(feats, logits, tgt, self.reversal())
        total = ce + self.cfg.weight * d_loss
        return StepOutput(total, logits, {"ce": ce.detach(), "domain": d_loss.detach()})

    def before_update(self, model: nn.Module) -> None:
        """During the warm-up the discriminator's gradients are zero by construction: dropped
        (None), so the optimizer skips it (no weight decay, no step count) as it did when the
        discriminator did not run."""
        if not self.adapting:
            for p in self.discriminator.parameters():
                p.grad = None
