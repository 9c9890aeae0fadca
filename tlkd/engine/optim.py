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
    layer-wise LR decay from timm), plus the objective's own parameters (e.g. adapters).
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
    extra = [p for p in objective.parameters() if p.requires_grad]
    if extra:
        optimizer.add_param_group({"params": extra, "weight_decay": opt.weight_decay})
    return optimizer


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
    return scheduler
