"""adapt: transductive transfer. A model learns from a labelled source domain and unlabelled
images of the target domain (a method of tlkd/adapt/registry.py), scored on the target's val set
(``data.val``) and, when given, the source's (``adapt.source_val``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlkd.adapt.registry import METHODS
from tlkd.config.schema import Config
from tlkd.data.datasets import labeled_folder, unlabeled
from tlkd.data.paired import PairedLoader
from tlkd.data.pipeline import extra_loader
from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError
from tlkd.recipes.build import build_experiment, subset_seed
from tlkd.recipes.runner import train


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
            "adapt", f"tlkd adapt needs an adapt: section (method: {'|'.join(METHODS)})"
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
    cfg = exp.cfg
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
    method = METHODS[a.method].load()
    stats = None
    if method.uses_target_stats(a):  # the target's BatchNorm statistics before val
        stats = extra_loader(cfg, target, exp.model_cfg, exp.device, train=False, **opts)
    if method.trains_on_target:
        target_train = extra_loader(
            cfg, target, exp.model_cfg, exp.device, train=True,
            generator=exp.loaders.train.generator, **opts,
        )  # fmt: skip
        exp.loaders.train = PairedLoader(exp.loaders.train, target_train)
    objective = method(a, source_val, runtime, stats, exp.model)
    plan = [
        f"adapt       {a.method}: {len(exp.splits.train):,} source images, {len(target):,} "
        f"unlabelled target images ({cfg.data.unlabeled}), target val {len(exp.splits.val):,}"
        + (f", source val {a.source_val}" if a.source_val else " (no adapt.source_val)"),
        *method.plan_lines(a, cfg.train.epochs),
    ]
    extra = {"adapt": a.method, "target_images": len(target), **method.summary_fields(a)}
    return train(exp, objective, "adapt", reporter, dry_run, plan, extra, resume)
