"""Transforms (timm's, from the model's data config) and seeded DataLoaders."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import create_transform, resolve_model_data_config
from timm.data.loader import PrefetchLoader
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from tlkd.config.schema import Config, DataConfig
from tlkd.data import decode, memory
from tlkd.data.batch_aug import BatchAugment, unsupported
from tlkd.data.catalog import SMALL_IMAGE_DATASETS
from tlkd.data.datasets import LabeledImages, Splits
from tlkd.data.ragged import Ragged
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


class PairOfViews(Transformed):
    """Two independent applications of ``transform`` to each image, stacked (2, C, H, W): the
    DataLoader path of contrastive pretraining (tlkd.ssl.simclr.TwoViews). Batch them with
    :func:`collate_views`."""

    def __getitem__(self, i: int):
        img, y = self.base[i]
        return torch.stack([self.transform(img), self.transform(img)]), y


def collate_views(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of PairOfViews as one batch [first views; second views], labels repeated."""
    pairs, targets = default_collate(batch)
    return torch.cat([pairs[:, 0], pairs[:, 1]]), targets.repeat(2)


class Normalized(PrefetchLoader):
    """The loader-worker path: workers return uint8 images (timm's transforms built with
    ``use_prefetcher=True``) and timm's PrefetchLoader converts, normalises and random-erases
    whole batches on the device, as timm's train.py does. Per-image float conversion in the
    workers costs the CPU that the model needs: on 2 cores this made evaluation over an image
    folder 1.1-1.25x faster (docs/performance.md). Adds the ``generator`` the trainer saves
    for resume."""

    @property
    def generator(self) -> torch.Generator | None:
        return self.loader.generator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.is_cuda or self.is_npu:  # copy and normalise the next batch on a side stream
            yield from super().__iter__()
            return
        # Nothing to overlap on the CPU, so no batch is prepared ahead: a batch's random
        # erasing draws from the RNG just before its own step, as the checkpoint's RNG state
        # assumes (a mid-epoch resume then replays it exactly).
        for images, targets in self.loader:
            images = images.to(self.img_dtype).sub_(self.mean).div_(self.std)
            if self.random_erasing is not None:
                images = self.random_erasing(images)
            yield images, targets


@dataclass
class Loaders:
    train: Normalized | memory.MemoryLoader
    val: Normalized | memory.MemoryLoader
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_memory: bool = False
    note: str = ""  # why the in-memory path was or was not taken, for the plan and summary


def resolve_input(data: DataConfig, model: torch.nn.Module) -> tuple[dict, dict[str, Any]]:
    """The model's timm data config, and the values it gives for the input keys left unset:
    ``{"data.image_size": ..., "data.crop_pct": ..., "data.interpolation": ...}`` (tiny-image
    datasets default to 32 px and no crop). ``data`` is not changed."""
    # timm reports the model's default size (often 224) even for models built for another size,
    # so the size is always passed explicitly (see notes on resolve_model_data_config).
    model_cfg = resolve_model_data_config(model)
    small = data.dataset in SMALL_IMAGE_DATASETS
    values: dict[str, Any] = {}
    if data.image_size is None:
        values["data.image_size"] = 32 if small else int(model_cfg["input_size"][-1])
    if data.crop_pct is None:
        values["data.crop_pct"] = 1.0 if small else float(model_cfg.get("crop_pct", 0.875))
    if data.interpolation is None:
        interp = model_cfg.get("interpolation", "bilinear")
        ok = interp in ("bilinear", "bicubic", "nearest")
        values["data.interpolation"] = interp if ok else "bilinear"
    return model_cfg, values


def build_transforms(data: DataConfig, model_cfg: dict) -> tuple[Callable, Callable]:
    """timm's per-image transforms, ending in uint8 tensors: normalisation and random erasing
    happen per batch in :class:`Normalized`."""
    aug = data.augment
    common = dict(
        input_size=(3, data.image_size, data.image_size),
        interpolation=data.interpolation,
        mean=tuple(model_cfg["mean"]),
        std=tuple(model_cfg["std"]),
        use_prefetcher=True,
    )
    train_tf = create_transform(
        is_training=True,
        train_crop_mode=aug.crop_mode,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        vflip=aug.vflip,
        color_jitter=aug.color_jitter or None,  # timm keeps a no-op ColorJitter for 0
        grayscale_prob=aug.grayscale,
        auto_augment=aug.auto_augment,
        re_prob=aug.re_prob,
        **common,
    )
    eval_tf = create_transform(is_training=False, crop_pct=data.crop_pct, **common)
    return train_tf, eval_tf


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def build_loaders(
    cfg: Config,
    splits: Splits,
    model_cfg: dict,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> Loaders:
    """Train and val loaders: the in-memory path where ``data.in_memory`` allows and the data
    fit, else DataLoader workers running timm's per-image transforms. Under torchrun each
    process loads its share of every global batch (train.batch_size is the global batch)
    and of the val set."""
    train_tf, eval_tf = build_transforms(cfg.data, model_cfg)
    ddp = distributed.info()
    if cfg.train.batch_size % ddp.world:
        raise ConfigError(
            "train.batch_size",
            f"{cfg.train.batch_size} does not split evenly over {ddp.world} processes",
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
    generator = torch.Generator().manual_seed(cfg.seed + ddp.rank)
    val_index: Sequence[int] = range(len(splits.val))
    if ddp.enabled:  # a shard per process, no padding: metrics gather the whole set
        val_index = range(ddp.rank, len(splits.val), ddp.world)
    mean, std = tuple(model_cfg["mean"]), tuple(model_cfg["std"])
    held = _in_memory(cfg, splits, eval_tf, log)
    if isinstance(held, tuple):
        train_images, val_images, mapped = held
        if not mapped:  # on a GPU: the images live there when they fit (no copy per batch)
            train_images, val_images = memory.to_device([train_images, val_images], device)
        local = cfg.train.batch_size // ddp.world
        augment = BatchAugment(
            cfg.data.augment, cfg.data.image_size, mean, std, cfg.data.interpolation
        )
        train = memory.MemoryLoader(
            train_images, torch.tensor(splits.train.targets, dtype=torch.long), sampler,
            local, mean, std, augment, generator, device,
        )  # fmt: skip
        val = memory.MemoryLoader(
            val_images, torch.tensor(splits.val.targets, dtype=torch.long), val_index,
            local, mean, std, device=device,
        )  # fmt: skip
        size_mb = (train_images.numel() + val_images.numel()) / 2**20
        where = "memory-mapped from the cache folder" if mapped else "in memory"
        if train_images.device.type == "cuda":
            where = f"in {train_images.device} memory"
        kind = "uint8, of several sizes" if isinstance(train_images, Ragged) else "uint8"
        return Loaders(train, val, mean, std, True, f"{where} ({size_mb:.0f} MiB, {kind})")
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_workers()
    train_files = _drafted(cfg.data, splits.train)
    common = dict(
        batch_size=cfg.train.batch_size // ddp.world,
        num_workers=workers,
        # fresh workers each epoch draw their seeds from the loader's generator, so a resumed
        # run replays exactly the augmentation an uninterrupted run would have used
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )
    train = Normalized(
        DataLoader(
            Transformed(train_files, train_tf), sampler=sampler, generator=generator, **common
        ),
        mean, std, device=device, re_prob=cfg.data.augment.re_prob,
    )  # fmt: skip
    val_set: Dataset = Transformed(splits.val, eval_tf)
    if ddp.enabled:
        val_set = Subset(val_set, val_index)
    val = Normalized(DataLoader(val_set, shuffle=False, **common), mean, std, device=device)
    return Loaders(train, val, mean, std, False, f"{workers} loader workers ({held})")


def _drafted(data: DataConfig, ds: LabeledImages) -> LabeledImages:
    """Training images ``ds`` decoding their JPEGs at a reduced scale that keeps the resolution
    every sampled view needs (tlkd/data/decode.py), unless ``data.jpeg_draft`` is off. Eval
    views are always decoded whole: evaluate, predict and the in-memory path score the same
    pixels."""
    return _train_store(data, ds)[0]


def _train_store(data: DataConfig, ds: LabeledImages) -> tuple[LabeledImages, str]:
    """``_drafted``'s images with the in-memory path's cache tag for them (the store keeps the
    JPEGs reduced like the loader workers': less memory and a cheaper cut per view)."""
    if not data.jpeg_draft:
        return ds, "train"
    side = decode.needed_side(data.image_size, data.crop_pct, data.augment)
    return decode.with_draft(ds, side), f"train|draft{side}"


def _in_memory(
    cfg: Config, splits: Splits, eval_tf: Callable, log: Callable[[str], None]
) -> tuple[torch.Tensor, torch.Tensor, bool] | str:
    """Both splits as uint8 tensors, and whether they are memory-mapped from the cache folder
    (data over the memory budget, with room on disk); or why the in-memory path is not taken.
    With ``data.in_memory: true`` a reason is an error instead."""
    data = cfg.data
    if data.in_memory is False:
        return "data.in_memory: false"
    pil_eval = memory.pil_stage(eval_tf)
    reason = unsupported(data.augment)
    cache = memory.usable_cache_dir(data.cache_dir) if reason is None else None
    mapped, over = False, "the images"
    train_ds, train_tag = _train_store(data, splits.train)
    if reason is None:
        need = memory.estimate_bytes(train_ds, None)
        need += memory.estimate_bytes(splits.val, pil_eval)
        budget = memory.MEMORY_FRACTION * memory.available_memory()
        if need > budget:
            # larger than memory: decoded once into the cache folder and read from there
            mapped = True
            over = f"the images need {need / 2**30:.1f} GiB, over {budget / 2**30:.1f} GiB"
            files = all(len(d) == 0 or d.path(0) is not None for d in (splits.train, splits.val))
            if not files:
                reason = f"{over}, and only image files can be memory-mapped"
            elif cache is None:
                reason = f"{over}, and there is no usable cache folder to memory-map them from"
    if reason is None:
        workers = data.num_workers if data.num_workers is not None else default_workers()

        def load() -> tuple[torch.Tensor, torch.Tensor]:
            train = memory.load_images(
                train_ds, None, train_tag, cache, workers, log, mapped, ragged=True
            )
            val = memory.load_images(
                splits.val, pil_eval, f"eval|{pil_eval!r}", cache, workers, log, mapped
            )
            return train, val

        try:  # mapped: one process writes the files, the others then map them
            loaded = distributed.main_first(load) if mapped else load()
            return (*loaded, mapped)
        except memory.NotUniform as err:
            reason = f"training images differ in size ({err})"
        except OSError as err:  # a full disk while writing the mapped file
            reason = f"{over}, and the memory-mapped file could not be written ({err.strerror})"
    if data.in_memory is True:
        raise ConfigError("data.in_memory", f"cannot hold the data in memory: {reason}")
    return reason


def extra_loader(
    cfg: Config,
    ds: LabeledImages,
    model_cfg: dict,
    device: torch.device,
    *,
    train: bool,
    in_memory: bool,
    generator: torch.Generator | None = None,
    seed_offset: int = 1,
    log: Callable[[str], None] = print,
    two_views: bool = False,
) -> Normalized | memory.MemoryLoader:
    """A further loader over ``ds`` (e.g. the unlabelled target domain): training views with
    its own shuffling (``seed + seed_offset``), or the deterministic eval views; in memory when
    the main loaders are and ``ds`` allows, with loader workers otherwise. ``two_views``:
    batches of two training views per image, [first views; second views] (SimCLR)."""
    train_tf, eval_tf = build_transforms(cfg.data, model_cfg)
    ddp = distributed.info()
    local = cfg.train.batch_size // ddp.world
    mean, std = tuple(model_cfg["mean"]), tuple(model_cfg["std"])
    if train:
        sampler: Sequence[int] | GlobalBatchSampler = GlobalBatchSampler(
            len(ds), cfg.train.batch_size, cfg.seed + seed_offset, drop_last=True,
            world=ddp.world, rank=ddp.rank,
        )  # fmt: skip
    else:
        sampler = range(ddp.rank, len(ds), ddp.world) if ddp.enabled else range(len(ds))
    targets = torch.tensor(ds.targets, dtype=torch.long)
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_workers()
    if in_memory:
        cache = memory.usable_cache_dir(cfg.data.cache_dir)
        pil_eval = memory.pil_stage(eval_tf)
        try:
            if train:
                store, tag = _train_store(cfg.data, ds)
                images = memory.load_images(store, None, tag, cache, workers, log, ragged=True)
                (images,) = memory.to_device([images], device)
                augment = BatchAugment(
                    cfg.data.augment, cfg.data.image_size, mean, std, cfg.data.interpolation
                )
                return memory.MemoryLoader(
                    images, targets, sampler, local, mean, std, augment, generator, device
                )
            images = memory.load_images(ds, pil_eval, f"eval|{pil_eval!r}", cache, workers, log)
            (images,) = memory.to_device([images], device)
            return memory.MemoryLoader(images, targets, sampler, local, mean, std, device=device)
        except memory.NotUniform:
            pass  # images of several sizes: loader workers instead
    common = dict(batch_size=local, num_workers=workers, pin_memory=device.type == "cuda")
    if train:
        ds = _drafted(cfg.data, ds)
        if two_views:
            common["collate_fn"] = collate_views
        views = (PairOfViews if two_views else Transformed)(ds, train_tf)
        loader = DataLoader(views, sampler=sampler, generator=generator, **common)
        return Normalized(loader, mean, std, device=device, re_prob=cfg.data.augment.re_prob)
    view: Dataset = Transformed(ds, eval_tf)
    if ddp.enabled:
        view = Subset(view, list(sampler))
    return Normalized(DataLoader(view, shuffle=False, **common), mean, std, device=device)
