"""The optimizer and scheduler of a run, from timm's factories (weight-decay groups,
layer-wise LR decay, warm-up), stepped per optimizer update."""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from tlkd.config.schema import Config
from tlkd.engine.objectives import Objective


def build_optimizer(cfg: Config, model: nn.Module, objective: Objective) -> torch.optim.Optimizer:
    """timm's optimizer factory over all of the model's parameters (weight-decay groups and
    layer-wise LR decay from timm), plus the objective's own parameters (e.g. adapters,
    projectors, discriminators), split by the same no-weight-decay rule.
    Built before freezing so a later unfreeze finds its parameters in the optimizer."""
    opt = cfg.train.optimizer
    kwargs: dict[str, Any] = {}
    if opt.name.lower() in ("sgd", "nesterov", "momentum", "rmsprop", "rmsproptf"):
        kwargs["momentum"] = opt.momentum
    optimizer = create_optimizer_v2(
        model,
        opt=opt.name,
        lr=opt.lr,
        weight_decay=opt.weight_decay,
        layer_decay=opt.layer_decay,
        **kwargs,
    )
    for group in objective.param_groups():
        for part in split_weight_decay({"weight_decay": opt.weight_decay, **group}):
            optimizer.add_param_group(part)
    return optimizer


def split_weight_decay(group: dict[str, Any]) -> list[dict[str, Any]]:
    """An objective's parameter group under timm's no-weight-decay rule, as the model's own
    groups are (``param_groups_weight_decay``): with weight decay, the tensors of 2 or more
    dimensions keep it and those of at most one (biases, normalisation scales and shifts)
    go into a copy of the group with ``weight_decay`` 0; without, the group as it is."""
    if not group.get("weight_decay"):
        return [group]
    decay = [p for p in group["params"] if p.ndim > 1]
    no_decay = [p for p in group["params"] if p.ndim <= 1]
    parts = [{**group, "params": decay}] if decay else []
    if no_decay:
        parts.append({**group, "params": no_decay, "weight_decay": 0.0})
    return parts


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    s = cfg.train.scheduler
    if s.name == "none" or cfg.train.epochs == 0:
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=s.name,
        num_epochs=cfg.train.epochs,
        decay_epochs=s.decay_epochs,
        decay_milestones=s.decay_milestones,
        decay_rate=s.decay_rate,
        min_lr=s.min_lr,
        warmup_lr=s.warmup_lr,
        warmup_epochs=s.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    if any(g.get("fixed_lr") for g in optimizer.param_groups):
        return FixedLrs(scheduler, optimizer)
    return scheduler


class FixedLrs:
    """A timm scheduler whose param groups marked ``fixed_lr`` (an objective's, e.g. SimSiam's
    predictor) keep their initial learning rate whatever the schedule sets, warm-up included.
    The groups are looked up at every step: loading an optimizer's state replaces them."""

    def __init__(self, scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
        self.scheduler, self.optimizer = scheduler, optimizer
        self._reset()  # the scheduler's constructor may have set a warm-up lr

    def _reset(self) -> None:
        for group in self.optimizer.param_groups:
            if group.get("fixed_lr"):
                group["lr"] = group["initial_lr"]

    def step(self, epoch: int, metric: float | None = None) -> None:
        self.scheduler.step(epoch, metric)
        self._reset()

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        self.scheduler.step_update(num_updates, metric)
        self._reset()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
