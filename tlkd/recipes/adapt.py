"""adapt: transductive transfer. A model learns from a labelled source domain and unlabelled
images of the target domain (a method of tlkd/adapt/registry.py), scored on the target's val set
(``data.val``) and, when given, the source's (``adapt.source_val``). A source-free method
(``MethodEntry.source_free``) adapts a trained model (``model.pretrained``) on target images
alone; an online one (the objective's ``online``) on the val stream while predicting it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlkd.adapt.registry import METHODS
from tlkd.config.schema import Config
from tlkd.data.datasets import labeled_folder, shuffled, unlabeled
from tlkd.data.paired import PairedLoader
from tlkd.data.pipeline import extra_loader
from tlkd.engine import distributed
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
    entry = METHODS[a.method]
    method = entry.load()
    online = method.online(a)  # adapts on the data.val stream: no data.unlabeled
    if cfg.data.unlabeled is None and not online:
        raise ConfigError("data.unlabeled", "adapt needs the target domain's images (a folder)")
    if cfg.data.unlabeled is not None and online:
        raise ConfigError(
            "data.unlabeled",
            f"adapt.method {a.method} with adapt.online adapts on the data.val stream and reads "
            "no other images; drop data.unlabeled",
        )
    if entry.source_free:
        _check_source_free(cfg, online)
    elif cfg.data.train is None or cfg.data.val is None:
        key = "data.train" if cfg.data.train is None else "data.val"
        raise ConfigError(
            key, "adapt needs the labelled source (data.train) and target val (data.val)"
        )
    reporter = reporter or Reporter(cfg.train.log_every)
    target = (
        unlabeled(cfg.data.unlabeled, cfg.data.unlabeled_limit, subset_seed(cfg))
        if cfg.data.unlabeled is not None
        else None
    )
    # a source-free run trains on the target images: its image size and augmentation follow
    # them (or the source run's size), not the empty data.train
    source_free = (target if not online else "val") if entry.source_free else None
    exp = build_experiment(
        cfg, log=reporter.print, resume=resume, dry_run=dry_run, source_free=source_free,
        shuffle_val=method.val_batch_stats,
    )  # fmt: skip
    cfg = exp.cfg
    if entry.source_free and exp.weights.head != "loaded":
        raise ConfigError(
            "model.pretrained",
            f"adapt.method {a.method} adapts the source model with its classifier, but "
            f"{exp.weights.source} gave no classifier for the classes {exp.classes} (another "
            "task or shape)",
        )
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
        if method.val_batch_stats:  # batch statistics need batches of mixed classes
            source = shuffled(source, subset_seed(cfg))
        source_val = extra_loader(cfg, source, exp.model_cfg, exp.device, train=False, **opts)
    stats = None
    # eval views of the target: its BatchNorm statistics before val, or read by the objective
    if target is not None and (method.uses_target_stats(a) or method.reads_target_set):
        stats = extra_loader(cfg, target, exp.model_cfg, exp.device, train=False, **opts)
    if entry.source_free:  # target batches alone: data.unlabeled's, or the val stream's
        exp.loaders.train = (
            exp.loaders.val
            if online
            else extra_loader(
                cfg, target, exp.model_cfg, exp.device, train=True,
                generator=exp.loaders.train.generator, seed_offset=0, **opts,
            )
        )  # fmt: skip
    elif method.trains_on_target:
        target_train = extra_loader(
            cfg, target, exp.model_cfg, exp.device, train=True,
            generator=exp.loaders.train.generator, **opts,
        )  # fmt: skip
        exp.loaders.train = PairedLoader(exp.loaders.train, target_train)
    objective = method(a, source_val, runtime, stats, exp.model)
    exp.loaders.train = objective.wrap_train_loader(exp.loaders.train)
    if not entry.source_free:
        images = f"{len(exp.splits.train):,} source images, "
    else:
        images = f"source-free from {exp.weights.source} (no labelled source images), "
    if online:
        images += f"online on the target val stream ({len(exp.splits.val):,} images)"
    else:
        images += (
            f"{len(target):,} unlabelled target images ({cfg.data.unlabeled}), target val "
            f"{len(exp.splits.val):,}"
        )
    plan = [
        f"adapt       {a.method}: {images}"
        + (f", source val {a.source_val}" if a.source_val else " (no adapt.source_val)"),
        *method.plan_lines(a, cfg.train.epochs),
    ]
    extra = {
        "adapt": a.method,
        "source_free": entry.source_free,
        "target_images": len(target) if target is not None else len(exp.splits.val),
        **method.summary_fields(a),
    }
    return train(exp, objective, "adapt", reporter, dry_run, plan, extra, resume)


def _check_source_free(cfg: Config, online: bool) -> None:
    """A source-free method adapts a trained model without the labelled source: no data.train,
    and model.pretrained names the trained model (a tlkd run directory or a weights file). The
    method decides what trains (no model.freeze); tent keeps its BatchNorm layers (no
    SyncBatchNorm); online, the protocol is one pass over the val stream, one update per
    batch, in one process."""
    a = cfg.adapt
    m = cfg.model
    if m.freeze != "none" or m.unfreeze_after is not None:
        key = "model.freeze" if m.freeze != "none" else "model.unfreeze_after"
        what = {
            "shot": " (every layer but the classifier's last Linear)",
            "tent": " (BatchNorm's scale and shift alone)",
        }.get(a.method, "")
        raise ConfigError(
            key,
            f"adapt.method {a.method} decides what trains{what}; drop model.freeze and "
            "model.unfreeze_after",
        )
    if a.method == "tent" and cfg.train.sync_bn:
        raise ConfigError(
            "train.sync_bn",
            "tent normalises every batch with its own statistics in its own BatchNorm layers, "
            "which SyncBatchNorm would replace (and share statistics across processes); drop "
            "train.sync_bn",
        )
    if online:
        if cfg.train.epochs > 1:
            raise ConfigError(
                "train.epochs",
                f"is {cfg.train.epochs}; adapt.online is one pass over the data.val stream, "
                "each batch scored before its update: set it to 1",
            )
        if cfg.train.accum_steps > 1:
            raise ConfigError(
                "train.accum_steps",
                f"is {cfg.train.accum_steps}; adapt.online makes one update per batch, as "
                "tent's forward_and_adapt: set it to 1",
            )
        if distributed.info().world > 1:
            raise ConfigError(
                "adapt.online",
                f"adapts on one stream in order, which {distributed.info().world} torchrun "
                "processes would split (each adapting on its share, their updates averaged): "
                "run it in one process, or adapt offline on data.unlabeled",
            )
    if cfg.data.train is not None:
        raise ConfigError(
            "data.train",
            f"adapt.method {a.method} is source-free: it adapts model.pretrained on target "
            "images alone and never reads labelled source data; drop data.train",
        )
    if cfg.data.val is None:
        raise ConfigError("data.val", "adapt needs the target's labelled val set (data.val)")
    if not isinstance(cfg.model.pretrained, str) or cfg.model.pretrained == "auto":
        raise ConfigError(
            "model.pretrained",
            f"adapt.method {a.method} is source-free: it starts from the trained source model, "
            "so set model.pretrained to its tlkd run directory or weights file (is "
            f"{cfg.model.pretrained!r})",
        )
