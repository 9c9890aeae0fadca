"""adapt: transductive transfer. A model learns from a labelled source domain and unlabelled
images of the target domain (AdaBN, pseudo-labelling or DANN), scored on the target's val set
(``data.val``) and, when given, the source's (``adapt.source_val``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tlkd.adapt.data import PairedLoader
from tlkd.adapt.objectives import DANN, AdaBN, PseudoLabel
from tlkd.config.schema import Config
from tlkd.data.datasets import labeled_folder, unlabeled
from tlkd.data.pipeline import extra_loader
from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError
from tlkd.recipes.common import build_experiment, subset_seed, train


@torch.no_grad()
def classifier_inputs(model: torch.nn.Module, size: int, device: torch.device) -> int:
    """Width of the feature vector the model's classifier reads (any timm model or head)."""
    seen: list[int] = []
    hook = model.get_classifier().register_forward_hook(
        lambda _m, inputs, _o: seen.append(inputs[0].shape[-1])
    )
    was = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, size, size, device=device))
    finally:
        hook.remove()
        model.train(was)
    return seen[0]


def adapt(
    cfg: Config,
    *,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    resume: Path | None = None,
) -> dict[str, Any] | None:
    """Adapt as ``cfg`` says; returns the run's summary (None for a dry run)."""
    a = cfg.adapt
    if a is None:
        raise ConfigError(
            "adapt", "tlkd adapt needs an adapt: section (method: adabn|pseudo_label|dann)"
        )
    if cfg.teacher_list or cfg.distill is not None:
        raise ConfigError(
            "teacher" if cfg.teacher_list else "distill",
            "adapt takes no teachers; distil from an adapted run with `tlkd distill`",
        )
    if cfg.data.unlabeled is None:
        raise ConfigError("data.unlabeled", "adapt needs the target domain's images (a folder)")
    if cfg.data.train is None or cfg.data.val is None:
        key = "data.train" if cfg.data.train is None else "data.val"
        raise ConfigError(
            key, "adapt needs the labelled source (data.train) and target val (data.val)"
        )
    reporter = reporter or Reporter(cfg.train.log_every)
    target = unlabeled(cfg.data.unlabeled, cfg.data.unlabeled_limit, subset_seed(cfg))
    exp = build_experiment(cfg, log=reporter.print, resume=resume, dry_run=dry_run)
    memory = exp.loaders.in_memory
    runtime = {"device": exp.device, "dtype": exp.dtype, "channels_last": cfg.train.channels_last}
    opts = dict(in_memory=memory, log=reporter.print)
    source_val = None
    if a.source_val is not None:
        source = labeled_folder(a.source_val, "adapt.source_val")
        if source.classes != exp.classes:
            raise ConfigError(
                "adapt.source_val", f"has classes {source.classes}, not {exp.classes}"
            )
        source_val = extra_loader(cfg, source, exp.model_cfg, exp.device, train=False, **opts)
    stats = None
    if a.method == "adabn" or a.target_bn:  # the target's BatchNorm statistics before val
        stats = extra_loader(cfg, target, exp.model_cfg, exp.device, train=False, **opts)
    if a.method == "adabn":
        objective = AdaBN(a, source_val, runtime, stats)
    else:
        target_train = extra_loader(
            cfg, target, exp.model_cfg, exp.device, train=True,
            generator=exp.loaders.train.generator, **opts,
        )  # fmt: skip
        exp.loaders.train = PairedLoader(exp.loaders.train, target_train)
        if a.method == "pseudo_label":
            objective = PseudoLabel(a, source_val, runtime, stats)
        else:
            features = classifier_inputs(exp.model, cfg.data.image_size, exp.device)
            objective = DANN(a, source_val, runtime, stats, exp.model, features)
    plan = [
        f"adapt       {a.method}: {len(exp.splits.train):,} source images, {len(target):,} "
        f"unlabelled target images ({cfg.data.unlabeled}), target val {len(exp.splits.val):,}"
        + (f", source val {a.source_val}" if a.source_val else " (no adapt.source_val)"),
    ]
    if a.method != "adabn":
        plan.append(
            "batchnorm   "
            + (
                "per domain in training (adapt.target_bn: true, the per-domain-BN variant); "
                "re-estimated on the target before every validation"
                if a.target_bn
                else "one batch of source and target images, shared statistics "
                f"(plain {'DANN' if a.method == 'dann' else 'pseudo-labelling'}; "
                "adapt.target_bn: false)"
            )
        )
    if a.method == "dann":
        span = max(cfg.train.epochs - a.warmup_epochs, 0)
        plan.append(
            "grl         Ganin's lambda = 2/(1+exp(-10 p)) - 1 per step, p from 0 to 1 over "
            f"the {span} epochs after {a.warmup_epochs} warm-up"
        )
    extra = {"adapt": a.method, "target_images": len(target)}
    if a.method != "adabn":
        extra["target_bn"] = a.target_bn
    return train(exp, objective, "adapt", reporter, dry_run, plan, extra, resume)
