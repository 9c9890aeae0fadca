"""Minimum Class Confusion (Jin et al., "Minimum Class Confusion for Versatile Domain
Adaptation", ECCV 2020): a loss on the target predictions alone, no discriminator. The
conventions (temperature 2.5, trade-off 1, entropy weights, the reductions) are those of
thuml/Transfer-Learning-Library (tllib/self_training/mcc.py and its MCC example)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from tlkd.adapt.objectives import DomainObjective, _source_ce, certainty_weights
from tlkd.config.schema import AdaptConfig
from tlkd.engine.objectives import StepOutput


def mcc_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The class confusion of a batch of target logits: probabilities softened by
    ``temperature``; each row weighted by its certainty (``certainty_weights``, the mean
    weight 1); the classes' confusion matrix ``P^T diag(w) P`` with each row normalised to
    sum to 1; its off-diagonal sum over the number of classes. (tllib's code divides by
    ``sum(dim=1)`` without keepdim, i.e. normalises the columns; the matrix is symmetric,
    so the loss is the same.) In float32 (float64 stays), also under autocast: a bf16
    confusion matrix would round the loss and its gradient."""
    classes = logits.shape[1]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        probs = F.softmax(logits.to(dtype) / temperature, dim=1)
        w = certainty_weights(probs)
        confusion = (probs * w[:, None]).T @ probs
        confusion = confusion / confusion.sum(dim=1, keepdim=True)
        return (confusion.sum() - confusion.trace()) / classes


class MCC(DomainObjective):
    """Source cross-entropy plus ``adapt.weight`` x the minimum-class-confusion loss of the
    batch's target rows (after ``warmup_epochs``). Source and target images share a batch,
    as in tllib's MCC example, unless ``adapt.target_bn``."""

    title: ClassVar[str] = "MCC"

    @classmethod
    def plan_lines(cls, cfg: AdaptConfig, epochs: int) -> list[str]:
        n = cfg.warmup_epochs
        warm = f", after {n} warm-up epoch{'s' * (n != 1)}" if n else ""
        return [
            *super().plan_lines(cfg, epochs),
            f"mcc         class confusion of the target predictions at temperature "
            f"{cfg.temperature:g}, entropy-weighted rows, weight {cfg.weight:g}{warm}",
        ]

    def forward(self, model, images, targets) -> StepOutput:
        logits = self.run(model, images, targets)
        ce = _source_ce(logits, targets)
        tgt = targets < 0
        if not self.adapting or not tgt.any():
            return StepOutput(ce, logits, {"ce": ce.detach()})
        mcc = mcc_loss(logits[tgt].float(), self.cfg.temperature)
        total = ce + self.cfg.weight * mcc
        return StepOutput(total, logits, {"ce": ce.detach(), "mcc": mcc.detach()})
