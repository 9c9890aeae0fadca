"""L2-SP (Li et al. 2018, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks"): fine-tuning regularised toward the starting point instead of toward zero.

    penalty = alpha/2 * sum ||w - w0||^2 (pretrained tensors)  +  beta/2 * sum ||w||^2 (new head)

As the authors' official code (holyseven/TransferLearningClassification, ``_decay``, its default
``weight_decay_mode`` 1): the penalty is added to the batch's mean loss (so momentum and Adam's
moments see it, and its gradient is alpha * (w - w0)); each term is TensorFlow's ``l2_loss``,
half the sum of squares, summed over tensors (not averaged); it covers the weight tensors
(convolution kernels, linear matrices: here every parameter of 2 or more dimensions), not the
biases, BatchNorm/LayerNorm scales and shifts or the BatchNorm running statistics; and it
replaces weight decay (tlkd sets the default weight decay to 0 and refuses another). tllib's
``SPRegularization`` applies the same formula to every backbone parameter (the official code's
mode 101). A head loaded with the weights (same classes) is part of the starting point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tlkd.engine.objectives import Objective, StepOutput
from tlkd.models.head import classifier_names, is_head_key

DEFAULT_BETA = 0.01  # the official code's rate for new layers (train.sh: weight_decay_rate2)


def l2sp_names(
    model: nn.Module, start: dict[str, torch.Tensor], head_is_new: bool
) -> tuple[list[str], list[str]]:
    """(the parameters pulled toward their starting values, the new head's parameters under
    plain L2): weight tensors only (2 or more dimensions). The head is every classifier
    (both of a distilled DeiT: ``head`` and ``head_dist``)."""
    heads = classifier_names(model)
    toward_start, new_head = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2:
            continue
        if head_is_new and is_head_key(name, heads):
            new_head.append(name)
        elif name in start:
            toward_start.append(name)
    return toward_start, new_head


def l2sp_penalty(
    params: dict[str, torch.Tensor],
    start: dict[str, torch.Tensor],
    new_head: list[str],
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha/2 * sum ||w - w0||^2 over ``start``'s names, beta/2 * sum ||w||^2 over
    ``new_head``), in float32."""
    zero = next(iter(params.values())).new_zeros((), dtype=torch.float32)
    sp = sum(((params[n].float() - w0).pow(2).sum() for n, w0 in start.items()), zero)
    head = sum((params[n].float().pow(2).sum() for n in new_head), zero)
    return 0.5 * alpha * sp, 0.5 * beta * head


class L2SP(Objective):
    """``inner``'s loss plus the L2-SP penalty, logged as the parts ``l2sp`` (toward the
    start) and ``l2sp_head`` (the new head); ``ce`` is the inner loss when it has no parts.
    The starting values live on the model's device as plain tensors, not buffers: not in
    the checkpoint (the run's start.safetensors holds them) nor broadcast by DDP."""

    def __init__(
        self,
        inner: Objective,
        model: nn.Module,
        start: dict[str, torch.Tensor],
        alpha: float,
        beta: float,
        head_is_new: bool,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.alpha, self.beta = alpha, beta
        names, self.new_head = l2sp_names(model, start, head_is_new)
        params = dict(model.named_parameters())
        self.start = {
            n: start[n].detach().to(params[n].device, torch.float32, copy=True) for n in names
        }

    def penalty(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        params = dict(model.named_parameters())
        device = next(iter(params.values())).device
        with torch.autocast(device.type, enabled=False):
            return l2sp_penalty(params, self.start, self.new_head, self.alpha, self.beta)

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        out = self.inner(model, images, targets)
        sp, head = self.penalty(model)
        parts = dict(out.parts) or {"ce": out.loss.detach()}
        parts.update(l2sp=sp.detach(), l2sp_head=head.detach())
        return StepOutput(out.loss + sp + head, out.logits, parts)

    def counts(self, model: nn.Module) -> tuple[int, int]:
        """(parameters pulled toward the start, new-head parameters under plain L2)."""
        params = dict(model.named_parameters())
        return (
            sum(params[n].numel() for n in self.start),
            sum(params[n].numel() for n in self.new_head),
        )

    # everything else is the inner objective's
    def val_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return self.inner.val_metrics(logits, targets)

    def val_scores(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float | None]:
        return self.inner.val_scores(outputs, targets)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.inner.start_epoch(epoch, epochs)

    def train_metrics(self) -> dict[str, float | None]:
        return self.inner.train_metrics()

    def start_step(self, step: int, steps: int) -> None:
        self.inner.start_step(step, steps)

    def before_val(self, model: nn.Module) -> None:
        self.inner.before_val(model)

    def extra_val(self, model: nn.Module) -> dict[str, float]:
        return self.inner.extra_val(model)

    def attach(self, model: nn.Module) -> None:
        self.inner.attach(model)

    def before_update(self, model: nn.Module) -> None:
        self.inner.before_update(model)

    def after_update(self, model: nn.Module, update: int, updates: int) -> None:
        self.inner.after_update(model, update, updates)

    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups()
