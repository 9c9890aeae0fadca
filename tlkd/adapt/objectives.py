"""What a batch of labelled source and unlabelled target images (target -1) costs, per
adaptation method. All share the source cross-entropy and the per-epoch domain metrics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.adapt.adabn import reestimate_bn
from tlkd.adapt.grl import DomainDiscriminator, dann_lambda
from tlkd.config.schema import AdaptConfig
from tlkd.engine.distributed import gather_cat
from tlkd.engine.inference import classification_metrics, predict
from tlkd.engine.objectives import Objective, StepOutput


class DomainObjective(Objective):
    """Source cross-entropy; scores a labelled source val set after every validation.

    With ``target_stats`` (eval-transformed target images), BatchNorm statistics are
    re-estimated on the target before every validation (AdaBN), and with ``adapt.target_bn``
    each batch's source and target images go through the model separately, so BatchNorm
    normalises the target with target statistics in training too (domain-specific batch
    normalisation, as in Chang et al. 2019: a shared network whose normalisation is per
    domain)."""

    def __init__(
        self,
        cfg: AdaptConfig,
        source_val: Iterable | None,
        runtime: dict[str, Any],
        target_stats: Iterable | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.source_val = source_val
        self.runtime = runtime  # device, dtype, channels_last
        self.target_stats = target_stats
        self.epoch, self.epochs = 1, 1

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
        if self.target_stats is not None:
            r = self.runtime
            reestimate_bn(model, self.target_stats, r["device"], r["dtype"], r["channels_last"])

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = epoch, epochs

    @property
    def adapting(self) -> bool:
        """Past the warm-up epochs: the target term is on."""
        return self.epoch > self.cfg.warmup_epochs

    def extra_val(self, model: nn.Module) -> dict[str, float]:
        if self.source_val is None:
            return {}
        r = self.runtime
        logits, targets = gather_cat(
            *predict(model, self.source_val, r["device"], r["dtype"], r["channels_last"])
        )
        m = classification_metrics(logits, targets)
        return {"source_val_loss": m["loss"], "source_val_top1": m["top1"]}


def _source_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    src = targets >= 0
    return F.cross_entropy(logits[src].float(), targets[src])


class AdaBN(DomainObjective):
    """Trains on the source alone; before each validation the BatchNorm statistics are
    re-estimated on the target images, so the saved model carries the target's."""

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


class DANN(DomainObjective):
    """Domain-adversarial training (Ganin & Lempitsky 2015): a discriminator tells source from
    target on the classifier's input features, through gradient reversal, so the features
    learn to hide the domain. The discriminator is trained and checkpointed with the model but
    not saved in model.safetensors."""

    def __init__(self, cfg, source_val, runtime, target_stats, model: nn.Module, features: int):
        super().__init__(cfg, source_val, runtime, target_stats)
        self.discriminator = DomainDiscriminator(features, cfg.hidden)
        self._feats: list[torch.Tensor] = []
        # the classifier's input is the pooled feature vector of any timm model
        model.get_classifier().register_forward_hook(
            lambda m, inputs, _out: self._feats.append(inputs[0]) if m.training else None
        )

    def forward(self, model, images, targets) -> StepOutput:
        self._feats.clear()
        logits = self.run(model, images, targets)
        feats = torch.cat(self._feats)
        if len(self._feats) == 2:  # per domain: source rows first, as run() ordered them
            tgt = targets < 0
            feats = feats[torch.cat([(~tgt).nonzero(), tgt.nonzero()]).squeeze(1).argsort()]
        ce = _source_ce(logits, targets)
        if not self.adapting:
            return StepOutput(ce, logits, {"ce": ce.detach()})
        span = max(self.epochs - self.cfg.warmup_epochs, 1)
        lam = dann_lambda((self.epoch - self.cfg.warmup_epochs) / span)
        domain = (targets < 0).float()
        d_logits = self.discriminator(feats.float(), lam)
        d_loss = F.binary_cross_entropy_with_logits(d_logits, domain)
        total = ce + self.cfg.weight * d_loss
        return StepOutput(total, logits, {"ce": ce.detach(), "domain": d_loss.detach()})
