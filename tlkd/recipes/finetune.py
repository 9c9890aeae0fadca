"""finetune: a (pretrained) timm model, a new head, some layers frozen, trained on labels;
LP-FT (``train.lp_epochs``), L2-SP (``train.l2sp``) and LoRA (``model.lora``). A run from
pretrained weights keeps them as start.safetensors (for L2-SP's resume and ``tlkd wise``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tlkd.config.schema import Config
from tlkd.engine.l2sp import DEFAULT_BETA, L2SP
from tlkd.engine.objectives import Classification
from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError
from tlkd.models.factory import count_params, read_state_dict, state_dict_for_save
from tlkd.models.lora import require_peft
from tlkd.recipes.build import Experiment, build_experiment
from tlkd.recipes.runner import train
from tlkd.run.rundir import START


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
    if cfg.model.lora is not None:  # before any data is read
        require_peft()
    reporter = reporter or Reporter(cfg.train.log_every)
    exp = build_experiment(cfg, log=reporter.print, resume=resume, dry_run=dry_run)
    cfg = exp.cfg
    if len(exp.splits.train) == 0:
        raise ConfigError("data", "no training images left after subsetting")
    objective = Classification(cfg.train.label_smoothing)
    start, plan, summary = starting_point(exp, resume)
    if cfg.train.l2sp is not None:
        objective = l2sp_objective(exp, objective, start, plan)
    if exp.lora is not None:
        plan.append(exp.lora.plan_line(count_params(exp.model)[0]))
        summary["lora"] = exp.lora.summary()
    return train(
        exp, objective, "finetune", reporter, dry_run, plan, summary, resume,
        start_weights=start if resume is None else None,
    )  # fmt: skip


def starting_point(
    exp: Experiment, resume: Path | None
) -> tuple[dict[str, torch.Tensor] | None, list[str], dict[str, Any]]:
    """The weights training starts from when they are pretrained (start.safetensors of a new
    run; a resumed run reads its own, so L2-SP pulls toward the same values even if the
    pretrained file changed), with the LP-FT plan line and the summary entries."""
    cfg = exp.cfg
    pretrained = exp.weights.loaded > 0
    for key in ("lp_epochs", "l2sp"):
        if getattr(cfg.train, key) is not None and not pretrained:
            raise ConfigError(
                f"train.{key}",
                f"{'LP-FT' if key == 'lp_epochs' else 'L2-SP'} starts from pretrained weights, "
                f"but the model's are {exp.weights.source} (set model.pretrained)",
            )
    start, kept = None, False  # kept: the run has (or will have) its start.safetensors
    if pretrained:
        saved = resume / START if resume is not None else None
        kept = saved is None or saved.is_file()
        # a resumed run from before tlkd kept its start: the rebuilt model's weights
        start = (
            read_state_dict(saved, "--resume") if saved and kept else state_dict_for_save(exp.model)
        )
    plan: list[str] = []
    n, epochs = cfg.train.lp_epochs, cfg.train.epochs
    if n is not None:
        plan.append(
            f"lp-ft       epochs 1-{n}: the head alone (backbone frozen, its BatchNorm "
            f"{'in eval mode' if cfg.model.freeze_bn_stats else 'updating its statistics'}); "
            f"epochs {n + 1}-{epochs}: every layer; one optimizer and schedule throughout"
        )
    summary: dict[str, Any] = {
        "start_weights": START if kept else None,
        "lp_epochs": n,
        "l2sp": cfg.train.l2sp,
    }
    return start, plan, summary


def l2sp_objective(
    exp: Experiment, objective: Classification, start: dict[str, torch.Tensor], plan: list[str]
) -> L2SP:
    """``objective`` with the L2-SP penalty toward ``start`` (its plan line into ``plan``)."""
    t = exp.cfg.train
    beta = t.l2sp_beta if t.l2sp_beta is not None else DEFAULT_BETA
    reg = L2SP(objective, exp.model, start, t.l2sp, beta, exp.weights.head == "new")
    toward, head = reg.counts(exp.model)
    plan.append(
        f"l2sp        alpha {t.l2sp:g} x ||w - w0||^2 / 2 on {toward:,} pretrained weights, "
        f"beta {beta:g} x ||w||^2 / 2 on {head:,} new-head weights (biases and norm layers "
        f"free); weight decay {t.optimizer.weight_decay or 0:g}"
    )
    return reg
