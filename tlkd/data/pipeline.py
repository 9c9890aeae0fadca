"""Transforms (timm's, from the model's data config) and seeded DataLoaders."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.data import create_transform, resolve_model_data_config
from torch.utils.data import DataLoader, Dataset, Subset

from tlkd.config.schema import Config, DataConfig
from tlkd.data.catalog import SMALL_IMAGE_DATASETS
from tlkd.data.datasets import LabeledImages, Splits
from tlkd.engine import distributed
from tlkd.engine.distributed import GlobalBatchSampler
from tlkd.errors import ConfigError


class Transformed(Dataset):
    """Applies ``transform`` to the image of each ``(image, label)`` pair."""

    def __init__(self, base: LabeledImages, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, y = self.base[i]
        return self.transform(img), y


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    mean: tuple[float, ...]
    std: tuple[float, ...]


def resolve_input(data: DataConfig, model: torch.nn.Module) -> dict:
    """Fill image_size, crop_pct and interpolation from the model's timm data config (tiny-image
    datasets default to 32 px and no crop) and return that data config."""
    # timm reports the model's default size (often 224) even for models built for another size,
    # so the size is always passed explicitly (see notes on resolve_model_data_config).
    model_cfg = resolve_model_data_config(model)
    small = data.dataset in SMALL_IMAGE_DATASETS
    if data.image_size is None:
        data.image_size = 32 if small else int(model_cfg["input_size"][-1])
    if data.crop_pct is None:
        data.crop_pct = 1.0 if small else float(model_cfg.get("crop_pct", 0.875))
    if data.interpolation is None:
        interp = model_cfg.get("interpolation", "bilinear")
        data.interpolation = interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear"
    return model_cfg


def build_transforms(data: DataConfig, model_cfg: dict) -> tuple[Callable, Callable]:
    aug = data.augment
    common = dict(
        input_size=(3, data.image_size, data.image_size),
        interpolation=data.interpolation,
        mean=tuple(model_cfg["mean"]),
        std=tuple(model_cfg["std"]),
    )
    train_tf = create_transform(
        is_training=True,
        train_crop_mode=aug.crop_mode,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        vflip=aug.vflip,
        color_jitter=aug.color_jitter,
        auto_augment=aug.auto_augment,
        re_prob=aug.re_prob,
        **common,
    )
    eval_tf = create_transform(is_training=False, crop_pct=data.crop_pct, **common)
    return train_tf, eval_tf


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def build_loaders(cfg: Config, splits: Splits, model_cfg: dict, device: torch.device) -> Loaders:
    """Train and val loaders. Under torchrun each process loads its share of every global
    batch (train.batch_size is the global batch) and of the val set."""
    train_tf, eval_tf = build_transforms(cfg.data, model_cfg)
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_workers()
    ddp = distributed.info()
    if cfg.train.batch_size % ddp.world:
        raise ConfigError(
            "train.batch_size",
            f"{cfg.train.batch_size} does not split evenly over {ddp.world} processes",
        )
    common = dict(
        batch_size=cfg.train.batch_size // ddp.world,
        num_workers=workers,
        # fresh workers each epoch draw their seeds from the loader's generator, so a resumed
        # run replays exactly the augmentation an uninterrupted run would have used
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )
    sampler = GlobalBatchSampler(
        len(splits.train),
        cfg.train.batch_size,
        cfg.seed,
        # BatchNorm cannot train on a last batch of one image: drop the ragged batch
        drop_last=True,
        world=ddp.world,
        rank=ddp.rank,
    )
    train = DataLoader(
        Transformed(splits.train, train_tf),
        sampler=sampler,
        generator=torch.Generator().manual_seed(cfg.seed + ddp.rank),
        **common,
    )
    val_set: Dataset = Transformed(splits.val, eval_tf)
    if ddp.enabled:  # a shard per process, no padding: metrics gather the whole set
        val_set = Subset(val_set, range(ddp.rank, len(splits.val), ddp.world))
    val = DataLoader(val_set, shuffle=False, **common)
    return Loaders(train, val, tuple(model_cfg["mean"]), tuple(model_cfg["std"]))
