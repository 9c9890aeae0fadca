"""Build what a config describes, before any training: the device, data splits, model and
loaders, and the defaults chosen from them (learning rate, warm-up and weight decay, image
size, augmentation, precision and memory layout), each recorded with its reason."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_model_data_config
from timm.optim import list_optimizers
from torch import nn

from tlkd.config import safe_yaml
from tlkd.config.schema import Config
from tlkd.config.suggest import did_you_mean
from tlkd.data import defaults
from tlkd.data.catalog import SMALL_IMAGE_DATASETS
from tlkd.data.datasets import LabeledImages, Splits, build_splits
from tlkd.data.memory import usable_cache_dir
from tlkd.data.pipeline import Loaders, build_loaders, resolve_input
from tlkd.engine import distributed, tune
from tlkd.engine.device import autocast_dtype, resolve_device, seed_everything
from tlkd.errors import ConfigError
from tlkd.models.factory import WeightsReport, build_model
from tlkd.recipes.modes import mode_of
from tlkd.run.rundir import CONFIG, check_output_dir


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
