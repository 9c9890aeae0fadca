"""Building blocks every recipe shares: data, model, optimizer, scheduler, the run directory
and its summary. A recipe (finetune, distill, ...) picks an objective and calls these."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.data import resolve_model_data_config
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from torch import nn

from tlkd.config import safe_yaml
from tlkd.config.loader import resolved_dict
from tlkd.config.schema import Config
from tlkd.config.suggest import did_you_mean
from tlkd.data import defaults
from tlkd.data.catalog import SMALL_IMAGE_DATASETS
from tlkd.data.datasets import LabeledImages, Splits, build_splits
from tlkd.data.memory import usable_cache_dir
from tlkd.data.pipeline import Loaders, build_loaders, resolve_input
from tlkd.engine import distributed, tune
from tlkd.engine.device import autocast_dtype, resolve_device, seed_everything
from tlkd.engine.objectives import Objective
from tlkd.engine.progress import Reporter
from tlkd.engine.trainer import FitResult, Trainer
from tlkd.errors import ConfigError
from tlkd.models.factory import WeightsReport, build_model, count_params
from tlkd.models.freeze import Freezer
from tlkd.recipes.modes import mode_of
from tlkd.run.rundir import CONFIG, SUMMARY, RunDir, check_output_dir, write_json
from tlkd.versions import versions


@dataclass
class Experiment:
    """Everything built from a config, before any training."""

    cfg: Config
    splits: Splits
    model: nn.Module
    weights: WeightsReport
    loaders: Loaders
    device: torch.device
    dtype: torch.dtype | None
    model_cfg: dict  # timm's data config of the model (mean, std, ...)
    # defaults chosen from the data and the run: key -> why (plan lines, summary.json)
    choices: dict[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return self.splits.classes


def build_experiment(
    cfg: Config,
    *,
    for_training: bool = True,
    log: Callable[[str], None] | None = None,
    resume: Path | None = None,
    classifier: bool = True,
    dry_run: bool = False,
) -> Experiment:
    """Validate what needs the file system or timm, then build data and model (no training).
    Resolved values (image size, classes, ``auto`` precision and memory layout) are written
    back into ``cfg``; a resumed run keeps the values its first start chose. A dry run measures
    nothing: ``auto`` settings stay ``auto`` unless a measurement is remembered."""
    log = log or _log
    if for_training:  # before building anything: a run that could not save is no run
        if resume is not None:
            check_output_dir(resume, "--resume", write=not dry_run)
        else:
            check_output_dir(cfg.output_dir, write=not dry_run)
    seed_everything(cfg.seed, cfg.train.deterministic)
    if for_training:
        _check_optimizer(cfg)
    device = resolve_device(cfg.train.device)
    splits = build_splits(cfg.data, subset_seed(cfg))
    if (
        classifier
        and cfg.model.num_classes is not None
        and cfg.model.num_classes != len(splits.classes)
    ):
        raise ConfigError(
            "model.num_classes",
            f"is {cfg.model.num_classes} but the data has {len(splits.classes)} classes",
        )
    if classifier:
        cfg.model.num_classes = len(splits.classes)
        model, weights = build_model(cfg.model, len(splits.classes), splits.classes)
    else:  # a backbone alone (pretrain): features out, no classifier
        cfg.model.num_classes = 0
        model, weights = build_model(cfg.model, 0, None)
    choices: dict[str, str] = {}
    saved = _saved_config(resume)
    if for_training:
        _resolve_optimizer(cfg, weights.loaded > 0, saved, choices)
    native = (  # the training images' own size, read once for the two rules below
        _native_size(splits.train, subset_seed(cfg))
        if cfg.data.dataset not in SMALL_IMAGE_DATASETS
        and (for_training or cfg.data.image_size is None)
        else None
    )
    if cfg.data.image_size is None:
        cfg.data.image_size, choices["image_size"] = _default_image_size(cfg, native, model)
    model_cfg = resolve_input(cfg.data, model)
    if for_training:
        _resolve_augment(cfg, len(splits.train), native, weights.loaded > 0, saved, choices)
    model.to(device)
    _resolve_knobs(cfg, model, model_cfg, device, for_training, log, resume, dry_run)
    dtype = autocast_dtype(cfg.train.precision, device)
    if cfg.train.channels_last is True:
        model.to(memory_format=torch.channels_last)
    loaders = build_loaders(cfg, splits, model_cfg, device, log)
    return Experiment(cfg, splits, model, weights, loaders, device, dtype, model_cfg, choices)


def _saved_config(resume: Path | None) -> dict[str, Any]:
    """The config a resumed run was first started with ({} for a new run)."""
    if resume is None or not (resume / CONFIG).is_file():
        return {}
    saved = safe_yaml.safe_load((resume / CONFIG).read_text())
    return saved if isinstance(saved, dict) else {}


def _resolve_optimizer(
    cfg: Config, pretrained: bool, saved: dict[str, Any], choices: dict[str, str]
) -> None:
    """Learning rate, weight decay and warm-up left unset, by the rules of data/defaults.py;
    a resumed run keeps what its first start chose (the warm-up depends on the epochs, which
    a resume may change)."""
    t = cfg.train
    opt, sched = t.optimizer, t.scheduler
    first = saved.get("train", {}) if isinstance(saved.get("train"), dict) else {}
    for section, obj in (("optimizer", opt), ("scheduler", sched)):
        values = first.get(section) if isinstance(first.get(section), dict) else {}
        for key in ("lr", "weight_decay", "warmup_epochs"):
            if getattr(obj, key, 0) is None and values.get(key) is not None:
                setattr(obj, key, values[key])
                choices[key] = f"{values[key]:g} (as the run's first start chose)"
    if opt.lr is None:
        opt.lr, why = defaults.default_lr(opt.name, pretrained, t.batch_size * t.accum_steps)
        choices["lr"] = f"{opt.lr:g} ({why})"
    if opt.weight_decay is None:
        opt.weight_decay, why = defaults.default_weight_decay(opt.name)
        choices["weight_decay"] = f"{opt.weight_decay:g} ({why})"
    if sched.warmup_epochs is None:
        if sched.name == "none":
            sched.warmup_epochs, why = 0, "no scheduler"
        else:
            sched.warmup_epochs, why = defaults.default_warmup(t.epochs)
        choices["warmup_epochs"] = f"{sched.warmup_epochs} ({why})"


def _native_size(ds: LabeledImages, seed: int) -> int | None:
    """The training images' median shorter side, from up to 64 of them."""
    n = len(ds)
    if n == 0:
        return None
    paths = [ds.path(i) for i in range(n)] if ds.path(0) is not None else None
    if paths is not None:
        return defaults.median_size(defaults.sample_sizes(paths, seed=seed))
    picks = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:16].tolist()
    return defaults.median_size([ds[i][0].size for i in picks])


def _default_image_size(cfg: Config, native: int | None, model: nn.Module) -> tuple[int, str]:
    if cfg.data.dataset in SMALL_IMAGE_DATASETS:
        return 32, f"{cfg.data.dataset}: a dataset of tiny images"
    patch = getattr(model, "patch_embed", None)
    fixed_size = (
        getattr(patch, "img_size", None) if getattr(patch, "strict_img_size", False) else None
    )
    if fixed_size is not None:
        size = int(fixed_size[-1] if isinstance(fixed_size, (tuple, list)) else fixed_size)
        return defaults.choose_image_size(None, size, fixed=True)
    model_size = int(resolve_model_data_config(model)["input_size"][-1])
    fixed = bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False))
    if native is not None and native <= model_size and not fixed and cfg.data.crop_pct is None:
        # the images are used at their own size: the eval view keeps all of it, as training's
        cfg.data.crop_pct = 1.0
    return defaults.choose_image_size(native, model_size, fixed)


def _resolve_augment(
    cfg: Config,
    train_images: int,
    native: int | None,
    pretrained: bool,
    saved: dict[str, Any],
    choices: dict[str, str],
) -> None:
    """``data.augment``'s policy applied (a resumed run keeps what its first start chose)."""
    aug = cfg.data.augment
    first = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    if aug.policy == "auto" and isinstance(first.get("augment"), dict):
        cfg.data.augment = type(aug).model_validate(first["augment"])
        choices["augment"] = f"{cfg.data.augment.policy} (as the run's first start chose)"
        return
    facts = defaults.RunFacts(
        image_px=native or (32 if cfg.data.dataset in SMALL_IMAGE_DATASETS else None),
        train_images=train_images,
        epochs=cfg.train.epochs,
        pretrained=pretrained,
        mode=mode_of(cfg),
        dataset=cfg.data.dataset or "folder",
    )
    cfg.data.augment, why = defaults.resolve_augment(aug, facts)
    choices["augment"] = f"{cfg.data.augment.policy} ({why})"


def subset_seed(cfg: Config) -> int:
    """Seed of the data subsets (val hold-out, few labels, unlabelled subsets)."""
    return cfg.data.subset_seed if cfg.data.subset_seed is not None else cfg.seed


def _resolve_knobs(cfg, model, model_cfg, device, for_training, log, resume, dry_run) -> None:
    t = cfg.train
    if resume is not None and (resume / CONFIG).is_file():  # what the first start chose
        saved = (safe_yaml.safe_load((resume / CONFIG).read_text()) or {}).get("train", {})
        if t.precision == "auto" and saved.get("precision") not in (None, "auto"):
            t.precision = saved["precision"]
        if t.channels_last == "auto" and isinstance(saved.get("channels_last"), bool):
            t.channels_last = saved["channels_last"]
    batch = min(t.batch_size // distributed.info().world, 128)
    shape = (batch, int(model_cfg["input_size"][0]), cfg.data.image_size, cfg.data.image_size)
    t.precision, t.channels_last = tune.choose(
        t.precision, t.channels_last, model, device, shape, for_training, log,
        usable_cache_dir(cfg.data.cache_dir), measure=not dry_run,
    )  # fmt: skip


def _log(message: str) -> None:
    """Default for build-time messages (e.g. decoding images into memory): rank 0, stderr."""
    if distributed.info().is_main:
        print(message, file=sys.stderr, flush=True)


def _check_optimizer(cfg: Config) -> None:
    name = cfg.train.optimizer.name.lower()
    known = list_optimizers()
    if name not in known:
        raise ConfigError(
            "train.optimizer.name", f"timm has no optimizer {name!r}{did_you_mean(name, known)}"
        )


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


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; 0 where not measurable)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return 0.0


def plan_lines(exp: Experiment, steps_per_epoch: int, mode: str) -> list[str]:
    """A short human summary of what the run will do."""
    cfg, splits = exp.cfg, exp.splits
    total, trainable = count_params(exp.model)
    head = (
        f"MLP {cfg.model.head.hidden} + dropout {cfg.model.head.dropout}"
        if cfg.model.head is not None
        else "linear"
    )
    freeze = cfg.model.freeze if isinstance(cfg.model.freeze, str) else ", ".join(cfg.model.freeze)
    unfreeze = (
        f", unfreeze after epoch {cfg.model.unfreeze_after}" if cfg.model.unfreeze_after else ""
    )
    t = cfg.train
    return (
        [
            f"mode        {mode}",
            f"model       {cfg.model.name}  weights: {exp.weights.source}  head: {head} "
            f"({exp.weights.head}), {len(exp.classes)} classes",
            f"parameters  {total:,} total, {trainable:,} trainable, {total - trainable:,} frozen "
            f"(freeze: {freeze}{unfreeze})",
            f"data        {cfg.data.dataset}: {len(splits.train):,} train images, "
            f"{len(splits.val):,} val images ({splits.val_source}), {cfg.data.image_size}px, "
            f"{exp.loaders.note}",
            f"schedule    {t.epochs} epochs x {steps_per_epoch} steps (batch {t.batch_size}"
            f"{f', accumulate {t.accum_steps}' if t.accum_steps > 1 else ''}) = "
            f"{t.epochs * steps_per_epoch:,} steps; {t.optimizer.name} lr {t.optimizer.lr or 0:g}, "
            f"scheduler {t.scheduler.name}",
            f"device      {exp.device}, precision {_shown_precision(cfg, exp)}, "
            f"channels_last {str(t.channels_last).lower()}",
        ]
        + [f"{'default':<11} {key}: {why}" for key, why in exp.choices.items()]
        + ([f"warning     {exp.weights.warning}"] if exp.weights.warning else [])
        + (
            [f"skipped     {len(splits.bad_images)} unreadable images, e.g. {splits.bad_images[0]}"]
            if splits.bad_images
            else []
        )
    )


def _shown_precision(cfg: Config, exp: Experiment) -> str:
    if cfg.train.precision == "auto" and exp.device.type == "cpu":
        return "auto (measured when the run starts)"
    return str(exp.dtype or "fp32").removeprefix("torch.")


def write_summary(
    run: RunDir,
    exp: Experiment,
    mode: str,
    result: FitResult | None,
    status: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    total, trainable = count_params(exp.model)
    history = result.history if result else []
    summary: dict[str, Any] = {
        "experiment": exp.cfg.experiment,
        "mode": mode,
        "status": status,
        "run_dir": str(run.path),
        "model": exp.cfg.model.name,
        "classes": exp.classes,
        "num_classes": len(exp.classes),
        "epochs_done": len(history),
        "best_val_top1": result.best_val_top1 if result and result.best_val_top1 >= 0 else None,
        "best_epoch": result.best_epoch if result and result.best_val_top1 >= 0 else None,
        "final_val_top1": history[-1]["val_top1"] if history else None,
        "final_val_top5": history[-1]["val_top5"] if history else None,
        "params": total,
        "trainable_params": trainable,
        "train_images": len(exp.splits.train),
        "val_images": len(exp.splits.val),
        "wall_time_s": round(result.wall_time_s, 3) if result else 0.0,
        "skipped_steps": result.skipped_steps if result else 0,
        "skipped_images": len(exp.splits.bad_images),
        "skipped_image_files": exp.splits.bad_images[:50],
        "data_path": exp.loaders.note,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": str(exp.device),
        "precision": str(exp.dtype or "fp32").replace("torch.", ""),
        "weights_source": exp.weights.source,
        "weights": "pretrained" if exp.weights.loaded else "random",
        "weights_warning": exp.weights.warning,
        "defaults_chosen": exp.choices,
        "versions": versions(),
    }
    summary.update(extra or {})
    write_json(run.file(SUMMARY), summary)
    return summary


def train(
    exp: Experiment,
    objective: Objective,
    mode: str,
    reporter: Reporter,
    dry_run: bool = False,
    plan_extra: list[str] | None = None,
    summary_extra: dict[str, Any] | None = None,
    resume: Path | None = None,
) -> dict[str, Any] | None:
    """Build the optimizer, print the plan and run the shared loop, writing the run directory
    (or continuing ``resume``'s). A mode adds its own plan lines and summary entries."""
    cfg = exp.cfg
    objective.to(exp.device)
    if cfg.train.sync_bn and distributed.info().enabled:
        if exp.device.type != "cuda":
            raise ConfigError("train.sync_bn", "SyncBatchNorm needs GPUs (nccl); drop it on CPU")
        exp.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(exp.model)
    optimizer = build_optimizer(cfg, exp.model, objective)
    freezer = Freezer(exp.model, cfg.model)
    steps = len(exp.loaders.train)
    updates_per_epoch = -(-steps // cfg.train.accum_steps)
    scheduler = build_scheduler(cfg, optimizer, updates_per_epoch)
    if dry_run:
        reporter.print("resolved config:")
        reporter.print(yaml.safe_dump(resolved_dict(cfg), sort_keys=False).rstrip())
        reporter.print("")
        for line in plan_lines(exp, steps, mode) + (plan_extra or []):
            reporter.print(line)
        reporter.print("dry run: nothing trained, no run directory written")
        return None
    ddp = distributed.info()
    if resume is not None:
        run = RunDir(resume)
        check_resumable(run, cfg)
        state, note = run.load_checkpoint()
    else:  # rank 0 picks the folder; the other processes use the same one
        run = RunDir(
            distributed.broadcast(
                RunDir.create(cfg.output_dir, cfg.experiment).path if ddp.is_main else None
            )
        )
    write_summary_ = write_summary if ddp.is_main else (lambda *a, **k: None)
    if ddp.is_main:
        run.save_config(resolved_dict(cfg))
    reporter.print(f"run dir     {run.path}")
    for line in plan_lines(exp, steps, mode) + (plan_extra or []):
        reporter.print(line)
    write_summary_(run, exp, mode, None, "running", summary_extra)
    trainer = Trainer(
        model=exp.model,
        objective=objective,
        freezer=freezer,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=exp.loaders.train,
        val_loader=exp.loaders.val,
        device=exp.device,
        dtype=exp.dtype,
        cfg=cfg.train,
        unfreeze_after=cfg.model.unfreeze_after,
        run=run,
        reporter=reporter,
        weights_metadata={
            "format": "pt",
            "tlkd_model": cfg.model.name,
            "tlkd_num_classes": str(cfg.model.num_classes),
        },
        on_epoch_end=lambda r: write_summary_(run, exp, mode, r, "running", summary_extra),
    )
    start = 1
    if resume is not None:
        start = trainer.restore(state)
        reporter.print(f"resume      {note}: epoch {start} of {cfg.train.epochs}")
    # train.epochs 0 (adapt.method: adabn): validate the adapted model, train nothing
    result = trainer.fit(start) if cfg.train.epochs > 0 else trainer.validate_only()
    if not ddp.is_main:
        return None
    summary = write_summary(run, exp, mode, result, "finished", summary_extra)
    reporter.print(
        f"done: best val top-1 {summary['best_val_top1']:.2f}% (epoch {summary['best_epoch']}), "
        f"final {summary['final_val_top1']:.2f}%, {summary['wall_time_s']:.1f}s"
    )
    reporter.print(f"run dir: {run.path}")
    return summary


def check_resumable(run: RunDir, cfg: Config) -> None:
    """Resuming must continue the same experiment: only the epoch count may change."""
    saved_file = run.file(CONFIG)
    if not saved_file.is_file():
        raise ConfigError("--resume", f"{run.path} is not a tlkd run directory (no {CONFIG})")
    saved = _flatten(safe_yaml.safe_load(saved_file.read_text()))
    now = _flatten(resolved_dict(cfg))
    ignored = {"train.epochs", "output_dir", "experiment", "data.cache_dir"}
    differ = sorted(
        k for k in saved.keys() | now.keys() if k not in ignored and saved.get(k) != now.get(k)
    )
    if differ:
        shown = ", ".join(differ[:6]) + (", ..." if len(differ) > 6 else "")
        raise ConfigError("--resume", f"the config differs from the run's in: {shown}")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}
