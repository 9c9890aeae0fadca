"""Build what a config describes, before any training: the device, data splits, model and
loaders, and the defaults chosen from them (learning rate, warm-up and weight decay, image
size, augmentation, precision and memory layout), each recorded with its reason."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel
from timm.data import resolve_model_data_config
from timm.optim import get_optimizer_info, list_optimizers
from torch import nn

from tlkd.adapt.registry import METHODS as ADAPT_METHODS
from tlkd.config import safe_yaml
from tlkd.config.loader import with_values
from tlkd.config.schema import Config
from tlkd.config.suggest import did_you_mean
from tlkd.data import defaults
from tlkd.data.catalog import SMALL_IMAGE_DATASETS
from tlkd.data.datasets import LabeledImages, Splits, build_splits, shuffled
from tlkd.data.memory import usable_cache_dir
from tlkd.data.pipeline import Loaders, build_loaders, default_workers, resolve_input
from tlkd.engine import distributed, tune
from tlkd.engine.device import autocast_dtype, resolve_device, seed_everything
from tlkd.errors import ConfigError
from tlkd.models.factory import WeightsReport, build_model
from tlkd.models.lora import LoraReport, apply_lora
from tlkd.recipes.modes import mode_of
from tlkd.run import startup
from tlkd.run.rundir import CONFIG, check_output_dir


@dataclass
class Experiment:
    """Everything built from a config, before any training. ``cfg`` is the config the run
    uses: ``source`` (the validated config, read-only) with the values tlkd chose
    (``resolved``, dotted key -> value; the reasons of the defaults in ``choices``)."""

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
    source: Config | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    lora: LoraReport | None = None  # model.lora: the adapters injected for training
    # the start-up clock (summary.json startup_s)
    startup: startup.Startup = field(default_factory=startup.Startup)

    @property
    def classes(self) -> list[str]:
        return self.splits.classes

    def record(self, values: dict[str, Any]) -> None:
        """Values a mode chose after the build (e.g. distillation layers): into ``cfg`` and
        ``resolved``."""
        values = {k: _plain(v) for k, v in values.items()}
        self.cfg = with_values(self.cfg, values)
        self.resolved.update(values)


class Resolution:
    """The config being resolved: each chosen value makes a new config (the validated one is
    read-only) and is recorded, with its reason for the plan. Values a run's first start
    chose (``first``: a resumed run's, or a saved config's ``resolved``) are taken again for
    keys still left unset, so a resume or a rerun does what the first start did."""

    def __init__(self, cfg: Config, first: dict[str, Any]) -> None:
        self.cfg, self.first = cfg, first
        self.values: dict[str, Any] = {}
        self.choices: dict[str, str] = {}

    def keep_first(self, key: str, name: str | None = None) -> bool:
        """Take the first start's value of ``key`` if there is one and ``key`` is unset."""
        if key not in self.first or not _unset(_get(self.cfg, key)):
            return False
        self.set(key, self.first[key])
        if name:
            shown = self.first[key].get("policy") if name == "augment" else self.first[key]
            self.choices[name] = f"{shown} (as the run's first start chose)"
        return True

    def set(self, key: str, value: Any, name: str | None = None, why: str | None = None) -> None:
        value = _plain(value)
        if _plain(_get(self.cfg, key)) == value:
            return
        self.cfg = with_values(self.cfg, {key: value})
        self.values[key] = value
        if name and why:
            self.choices[name] = why


def _unset(value: Any) -> bool:
    return value is None or value == "auto" or getattr(value, "policy", None) == "auto"


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, list) else getattr(cfg, part)
    return cfg


def _plain(value: Any) -> Any:
    """YAML-able: sections as mappings, paths as strings, tuples as lists."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def build_experiment(
    cfg: Config,
    *,
    for_training: bool = True,
    log: Callable[[str], None] | None = None,
    resume: Path | None = None,
    classifier: bool = True,
    dry_run: bool = False,
    implied: dict[str, Any] | None = None,
    source_free: LabeledImages | Literal["val"] | None = None,
    shuffle_val: bool = False,
) -> Experiment:
    """Validate what needs the file system or timm, then build data and model (no training).
    ``cfg`` is not changed: the values chosen (image size, classes, defaults, ``auto``
    precision and memory layout, and the mode's ``implied`` values) make ``exp.cfg`` and are
    listed in ``exp.resolved``; a resumed run keeps the values its first start chose. A dry run
    measures nothing: ``auto`` settings stay ``auto`` unless a measurement is remembered.

    ``source_free``: a source-free adapt run (no data.train) and the target images it trains
    on instead (data.unlabeled's, or ``"val"``: the data.val stream, online). The image size
    is then model.pretrained's run directory's (the size the source model was trained at),
    or else the target images' own, and the augmentation follows the target images.
    ``shuffle_val``: data.val in a fixed random order (for BatchNorm on batch statistics)."""
    log = log or _log
    clock = startup.for_build()
    source = cfg
    r = Resolution(cfg, {**first_choices(resume), **cfg.resolved})
    for key, value in (implied or {}).items():
        r.set(key, value)
    cfg = r.cfg
    if for_training:  # before building anything: a run that could not save is no run
        if resume is not None:
            check_output_dir(resume, "--resume", write=not dry_run)
        else:
            check_output_dir(cfg.output_dir, write=not dry_run)
    seed_everything(cfg.seed, cfg.train.deterministic)
    _resolve_optimizer_name(r)
    cfg = r.cfg
    if for_training:
        _check_optimizer(cfg)
    device = resolve_device(cfg.train.device)
    with clock.phase("data"):  # listing the files, splits and subsets
        splits = build_splits(cfg.data, subset_seed(cfg))
        if shuffle_val:
            splits = replace(splits, val=shuffled(splits.val, subset_seed(cfg)))
    if (
        classifier
        and cfg.model.num_classes is not None
        and cfg.model.num_classes != len(splits.classes)
    ):
        raise ConfigError(
            "model.num_classes",
            f"is {cfg.model.num_classes} but the data has {len(splits.classes)} classes",
        )
    r.set("model.num_classes", len(splits.classes) if classifier else 0)
    cfg = r.cfg
    with clock.phase("model"):  # building it, reading its weights
        model, weights = build_model(
            cfg.model, cfg.model.num_classes, splits.classes if classifier else None
        )
    # LoRA adapters train; evaluate, export and wise read the merged weights of a plain model
    lora = apply_lora(model, cfg.model.lora) if for_training and cfg.model.lora else None
    if for_training:
        _resolve_optimizer(r, weights.loaded > 0)
    # the images training reads: data.train's, or a source-free run's target images
    train_images = splits.train
    if source_free is not None:
        train_images = splits.val if isinstance(source_free, str) else source_free
    with clock.phase("data"):  # the training images' own size, read once for two rules
        native = (
            _native_size(train_images, subset_seed(cfg))
            if cfg.data.dataset not in SMALL_IMAGE_DATASETS
            and (for_training or cfg.data.image_size is None)
            else None
        )
    unset = not r.keep_first("data.image_size", "image_size") and cfg.data.image_size is None
    # a source-free run takes the size its source run was trained at, where it can tell
    if unset and (source_free is None or not _source_run_input(r)):
        _default_image_size(r, native, model)
    r.keep_first("data.crop_pct")
    model_cfg, values = resolve_input(r.cfg.data, model)  # the model's defaults for the rest
    for key, value in values.items():
        r.set(key, value)
    if for_training:
        _resolve_augment(r, len(train_images), native, weights.loaded > 0)
    model.to(device)
    with clock.phase("auto_timing"):  # precision and channels_last: auto
        _resolve_knobs(r, model, model_cfg, device, for_training, log, dry_run)
    cfg = r.cfg
    dtype = autocast_dtype(cfg.train.precision, device)
    if cfg.train.channels_last is True:
        model.to(memory_format=torch.channels_last)
    # the data path and worker count decide the augmentation draws: a resume keeps them
    r.keep_first("data.in_memory")
    r.keep_first("data.num_workers")
    if r.cfg.data.num_workers is None:
        r.set("data.num_workers", default_workers())
    cfg = r.cfg
    with clock.phase("loaders"):  # decoding into memory (or the cache), loader set-up
        loaders = build_loaders(cfg, splits, model_cfg, device, log)
    r.set("data.in_memory", loaders.in_memory)
    if for_training:
        _resolve_compile(r, device, cfg.train.epochs * len(loaders.train))
    cfg = r.cfg
    return Experiment(
        cfg, splits, model, weights, loaders, device, dtype, model_cfg, r.choices, source,
        r.values, lora, clock,
    )  # fmt: skip


def first_choices(resume: Path | None) -> dict[str, Any]:
    """What a resumed run's first start chose: its config.yaml's ``resolved`` section, or,
    for a run saved before that section existed, nothing (its values are in place)."""
    if resume is None or not (resume / CONFIG).is_file():
        return {}
    saved = safe_yaml.safe_load((resume / CONFIG).read_text())
    first = saved.get("resolved") if isinstance(saved, dict) else None
    return dict(first) if isinstance(first, dict) else {}


def _resolve_optimizer_name(r: Resolution) -> None:
    """``train.optimizer.name`` when unset: the adaptation method's reference optimizer (its
    lr and weight decay too, where unset), else adamw."""
    if r.keep_first("train.optimizer.name", "optimizer") or r.cfg.train.optimizer.name:
        return
    method = ADAPT_METHODS[r.cfg.adapt.method] if r.cfg.adapt is not None else None
    if method is None or method.optimizer is None:
        r.set("train.optimizer.name", "adamw")
        return
    ref = method.optimizer
    applied = {"name": ref["name"]} | {
        key: ref[key]
        for key in ("lr", "weight_decay")
        if key in ref and getattr(r.cfg.train.optimizer, key) is None  # the user's value wins
    }
    for key, value in applied.items():
        r.set(f"train.optimizer.{key}", value)
    shown = ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in applied.items()
    )
    r.choices["optimizer"] = f"{shown} ({method.optimizer_source})"


def _resolve_optimizer(r: Resolution, pretrained: bool) -> None:
    """Learning rate, weight decay and warm-up left unset, by the rules of data/defaults.py;
    a resumed run keeps what its first start chose (the warm-up depends on the epochs, which
    a resume may change)."""
    t = r.cfg.train
    if not r.keep_first("train.optimizer.lr", "lr") and t.optimizer.lr is None:
        lr, why = defaults.default_lr(
            t.optimizer.name, pretrained, t.batch_size * t.accum_steps, _adaptive(t.optimizer.name)
        )
        r.set("train.optimizer.lr", lr, "lr", f"{lr:g} ({why})")
    wd_first = r.keep_first("train.optimizer.weight_decay", "weight_decay")
    if not wd_first and r.cfg.train.optimizer.weight_decay is None:
        wd, why = (
            (0.0, "train.l2sp replaces weight decay, as in L2-SP (Li et al. 2018)")
            if t.l2sp is not None
            else defaults.default_weight_decay(t.optimizer.name)
        )
        r.set("train.optimizer.weight_decay", wd, "weight_decay", f"{wd:g} ({why})")
    warm_first = r.keep_first("train.scheduler.warmup_epochs", "warmup_epochs")
    if not warm_first and r.cfg.train.scheduler.warmup_epochs is None:
        warm, why = (
            (0, "no scheduler") if t.scheduler.name == "none" else defaults.default_warmup(t.epochs)
        )
        r.set("train.scheduler.warmup_epochs", warm, "warmup_epochs", f"{warm} ({why})")


def _adaptive(optimizer: str) -> bool | None:
    """Whether timm's optimizer keeps per-parameter step sizes (Adam-like betas)."""
    try:
        return bool(get_optimizer_info(optimizer.lower()).has_betas)
    except (ValueError, KeyError):
        return None


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


def _source_run_input(r: Resolution) -> bool:
    """A source-free run whose model.pretrained is a tlkd run directory: the image size that
    run used (its config.yaml's ``resolved:`` value, else its config's own), and its eval
    crop (``crop_pct``) where unset here, so the source model sees its own input size. False
    (nothing set) when model.pretrained is no run directory or records no size."""
    pretrained = r.cfg.model.pretrained
    if not isinstance(pretrained, str) or pretrained == "auto":
        return False
    run = Path(pretrained)
    try:
        saved = safe_yaml.safe_load((run / CONFIG).read_text()) if run.is_dir() else None
    except (OSError, ValueError, yaml.YAMLError):  # an unreadable config: the default rule
        return False
    if not isinstance(saved, dict):
        return False
    resolved = saved.get("resolved") if isinstance(saved.get("resolved"), dict) else {}
    data = saved.get("data") if isinstance(saved.get("data"), dict) else {}

    def value(key: str) -> Any:
        return resolved.get(f"data.{key}", data.get(key))

    size = value("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        return False
    why = f"the size model.pretrained's run {run.name} was trained at ({size}px)"
    r.set("data.image_size", size, "image_size", why)
    crop = value("crop_pct")
    if r.cfg.data.crop_pct is None and isinstance(crop, (int, float)) and 0 < crop <= 1:
        r.set("data.crop_pct", float(crop))
    return True


def _default_image_size(r: Resolution, native: int | None, model: nn.Module) -> None:
    size, why = _image_size(r, native, model)
    r.set("data.image_size", size, "image_size", why)


def _image_size(r: Resolution, native: int | None, model: nn.Module) -> tuple[int, str]:
    cfg = r.cfg
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
        r.set("data.crop_pct", 1.0)
    return defaults.choose_image_size(native, model_size, fixed)


def _resolve_augment(r: Resolution, train_images: int, native: int | None, pretrained: bool):
    """``data.augment``'s policy applied (a resumed run keeps what its first start chose)."""
    if r.keep_first("data.augment", "augment"):
        return
    cfg = r.cfg
    facts = defaults.RunFacts(
        image_px=native or (32 if cfg.data.dataset in SMALL_IMAGE_DATASETS else None),
        train_images=train_images,
        epochs=cfg.train.epochs,
        pretrained=pretrained,
        mode=mode_of(cfg),
        dataset=cfg.data.dataset or "folder",
    )
    augment, why = defaults.resolve_augment(cfg.data.augment, facts)
    r.set("data.augment", augment, "augment", f"{augment.policy} ({why})")


def subset_seed(cfg: Config) -> int:
    """Seed of the data subsets (val hold-out, few labels, unlabelled subsets)."""
    return cfg.data.subset_seed if cfg.data.subset_seed is not None else cfg.seed


def _resolve_knobs(r: Resolution, model, model_cfg, device, for_training, log, dry_run) -> None:
    r.keep_first("train.precision")  # what the first start measured
    r.keep_first("train.channels_last")
    cfg = r.cfg
    t = cfg.train
    batch = min(t.batch_size // distributed.info().world, 128)
    shape = (batch, int(model_cfg["input_size"][0]), cfg.data.image_size, cfg.data.image_size)
    precision, channels_last = tune.choose(
        t.precision, t.channels_last, model, device, shape, for_training, log,
        usable_cache_dir(cfg.data.cache_dir), measure=not dry_run,
    )  # fmt: skip
    r.set("train.precision", precision)
    r.set("train.channels_last", channels_last)


def _resolve_compile(r: Resolution, device: torch.device, planned_steps: int) -> None:
    if r.keep_first("train.compile", "compile") or r.cfg.train.compile != "auto":
        return
    on, why = tune.compile_rule(device, planned_steps)
    r.set("train.compile", on, "compile", f"{str(on).lower()} ({why})")


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
