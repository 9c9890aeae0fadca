"""finetune: a (pretrained) timm model, a new head, some layers frozen, trained on labels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlkd.config.schema import Config
from tlkd.engine.objectives import Classification
from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError
from tlkd.recipes.build import build_experiment
from tlkd.recipes.runner import train


def finetune(
    cfg: Config,
    *,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    resume: Path | None = None,
) -> dict[str, Any] | None:
    """Train as ``cfg`` says; returns the run's summary (None for a dry run)."""
    if cfg.teacher_list or cfg.distill is not None:
        raise ConfigError(
            "teacher" if cfg.teacher_list else "distill",
            "finetune takes no teachers or distill section; run `tlkd distill`",
        )
    if cfg.data.unlabeled is not None:
        raise ConfigError(
            "data.unlabeled", "finetune learns from labels only; use `tlkd adapt` or `tlkd distill`"
        )
    if cfg.data.dataset == "folder" and cfg.data.train is None:
        raise ConfigError("data.train", "is required to train (an image folder)")
    reporter = reporter or Reporter(cfg.train.log_every)
    exp = build_experiment(cfg, log=reporter.print, resume=resume, dry_run=dry_run)
    cfg = exp.cfg
    if len(exp.splits.train) == 0:
        raise ConfigError("data", "no training images left after subsetting")
    objective = Classification(cfg.train.label_smoothing)
    return train(exp, objective, "finetune", reporter, dry_run, resume=resume)
