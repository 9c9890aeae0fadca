"""Objectives: what loss a batch gives. Modes differ here, not in the loop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.engine.inference import classification_metrics


@dataclass
class StepOutput:
    """Rows whose target is negative (unlabelled images) count for throughput, not accuracy."""

    loss: torch.Tensor  # what is back-propagated
    logits: torch.Tensor  # the model's class scores, for accuracy
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named loss terms, logged


class Objective(nn.Module, ABC):
    """Computes a batch's loss from the model. Submodules of an objective (e.g. adapters)
    are trained with the model but are not part of the saved model."""

    @abstractmethod
    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        """The loss of one batch."""

    def val_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Extra validation metrics of this objective (e.g. per task), logged per epoch."""
        return {}

    def val_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
        """``loss``, ``top1``, ``top5`` of the val set from the model's outputs; top1 picks the
        best epoch. Objectives whose model has no classifier (pretrain) score otherwise."""
        return classification_metrics(outputs, targets)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Told at the start of every training epoch (e.g. for warm-ups and schedules)."""

    def train_metrics(self) -> dict[str, float | None]:
        """Per-epoch training metrics the objective gathered itself over the epoch (e.g.
        distill's teacher top-1 on the training views), logged with the epoch's row. Called
        after every training epoch on every process (sum over processes here)."""
        return {}

    def start_step(self, step: int, steps: int) -> None:
        """Told before every training step: ``step`` (1-based) of the epoch's ``steps`` (e.g.
        for per-iteration schedules; a position, not a count, so a resume gets it exactly)."""

    def before_val(self, model: nn.Module) -> None:
        """Runs before each validation (e.g. AdaBN re-estimates BatchNorm statistics)."""

    def extra_val(self, model: nn.Module) -> dict[str, float]:
        """Metrics on further val sets (e.g. the source domain's), logged per epoch."""
        return {}

    def attach(self, model: nn.Module) -> None:
        """Told the model once, before the optimizer is built and a checkpoint is restored
        (e.g. BYOL copies it into its target network, which the checkpoint then holds)."""

    def before_update(self, model: nn.Module) -> None:
        """Told before every optimizer step, the gradients complete (all-reduced under DDP)
        and not yet clipped (e.g. to drop a module's gradients so the step skips it)."""

    def after_update(self, model: nn.Module, update: int, updates: int) -> None:
        """Told after every optimizer step: ``update`` (1-based) of the run's planned
        ``updates`` (e.g. BYOL's EMA of the target network; a count, so a resume gets it)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """The objective's trainable parameters as optimizer groups (one by default). A group
        with ``fixed_lr: True`` keeps its initial learning rate through the schedule (e.g.
        SimSiam's predictor)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []


class Classification(Objective):
    """Cross-entropy on ground-truth labels (finetune)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        logits = model(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        return StepOutput(loss, logits)
