"""The teacher cache: teacher outputs computed once and reused by every run that names the
same teacher, data and augmentation (``distill.cache``).

With random augmentation the student never sees the same view twice, so a cache of one output
per image would be wrong. As in FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for
Visual Recognition", ECCV 2022), the cache is a bank of ``views`` random views per image: each
view is stored as its augmentation parameters (a row of tlkd.data.batch_aug) together with the
teacher's logits for it. In training, every image draws one of its views each epoch; the view
is re-rendered from its parameters and the stored logits stand in for the teacher. With
deterministic augmentation one view per image is exact. A sweep over students, losses or seeds
pays for the teacher once. Logit losses only: feature losses need the teacher's feature maps.

torchdistill's output cache stores one output per sample (exact only without random
augmentation), so it cannot serve augmented training; this module is tlkd's own.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tlkd.data.memory import MemoryLoader
from tlkd.data.ragged import Ragged
from tlkd.distill.teacher import Teacher
from tlkd.engine.device import autocast
from tlkd.run.rundir import replacing

VERSION = 2  # 2: CPU views of images larger than the view are cut and resized per image


def digest(*parts: object) -> str:
    h = hashlib.sha256(f"v{VERSION}".encode())
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        else:
            h.update(f"|{part}".encode())
    return h.hexdigest()[:24]


def teacher_digest(teacher: Teacher) -> str:
    """Identity of a teacher: architecture, weights, buffers and input re-normalisation."""
    state = teacher.model.state_dict()
    renorm = [] if teacher.renorm is None else list(teacher.renorm)
    return digest(teacher.name, *state.keys(), *state.values(), *renorm)


@dataclass
class Slot:
    """The current batch's cached teacher logits, one entry per teacher (None: unused)."""

    logits: list[torch.Tensor | None] = field(default_factory=list)


class CachedTeacher:
    """Stands in for a teacher inside the objective: returns the current batch's stored logits."""

    def __init__(self, teacher: Teacher, slot: Slot, index: int) -> None:
        self.teacher, self.slot, self.index = teacher, slot, index
        self.name, self.classes, self.num_classes = (
            teacher.name,
            teacher.classes,
            teacher.num_classes,
        )

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = self.slot.logits[self.index]
        assert logits is not None and len(logits) == len(images), "cache out of step"
        return logits, []


@dataclass
class Bank:
    params: torch.Tensor  # (N, views, N_PARAMS) augmentation of every stored view
    logits: list[torch.Tensor | None]  # per teacher: (N, views, classes), float32
    files: list[Path]
    built_s: float  # seconds spent computing (0 when every file came from the cache)


def build_bank(
    loader: MemoryLoader,
    teachers: list[Teacher],
    used: list[bool],
    views: int,
    seed: int,
    dtype: torch.dtype | None,
    device: torch.device,
    cache_dir: Path | None,
    log: Callable[[str], None],
) -> Bank:
    """Load the bank for these teachers and data from ``cache_dir``, computing what is missing.
    With no usable cache folder (None) the bank is computed and kept in memory only."""
    aug = loader.augment
    assert aug is not None
    images = loader.images
    n = len(images)
    if isinstance(images, Ragged):  # a size per image, repeated for its views
        height, width = (s.repeat_interleave(views) for s in images.sizes())
        stored_as: tuple[torch.Tensor, ...] = (images.data, images.index)
    else:
        height, width = images.shape[2:]
        stored_as = (images,)
    data_key = digest(
        *stored_as, aug.aug.model_dump_json(), aug.size, aug.interpolation, aug.mean, aug.std
    )
    params_key = digest(data_key, views, seed)
    stored = cache_dir is not None
    folder = cache_dir / "teacher" if cache_dir is not None else Path()
    t0 = time.perf_counter()
    built = 0.0
    params_file = folder / f"views-{params_key}.safetensors"
    if stored and params_file.exists():
        params = load_file(params_file)["params"]
    else:
        g = torch.Generator().manual_seed(seed)
        params = aug.sample(n * views, height, width, g).view(n, views, -1)
        if stored:
            _save({"params": params}, params_file)
    logits: list[torch.Tensor | None] = []
    files = [params_file]
    for teacher, use in zip(teachers, used, strict=True):
        if not use:
            logits.append(None)
            continue
        precision = str(dtype).replace("torch.", "") if dtype else "fp32"
        file = (
            folder / f"logits-{digest(params_key, teacher_digest(teacher), precision)}.safetensors"
        )
        files.append(file)
        if stored and file.exists():
            logits.append(load_file(file)["logits"])
            continue
        where = file if stored else "memory only (no usable cache folder)"
        log(f"teacher cache: {teacher.name} on {n:,} images x {views} views -> {where}")
        start = time.perf_counter()
        out = _teacher_logits(loader, teacher, params, dtype, device)
        built += time.perf_counter() - start
        if stored:
            _save({"logits": out}, file)
        logits.append(out)
    if built == 0.0 and stored:
        took = time.perf_counter() - t0
        log(f"teacher cache: {views} views per image, read from {folder} ({took:.1f}s)")
    return Bank(params, logits, files if stored else [], built)


@torch.inference_mode()
def _teacher_logits(loader, teacher, params, dtype, device, batch: int = 512) -> torch.Tensor:
    n, views, _ = params.shape
    weights = [p for p in teacher.model.parameters() if p.dim() == 4]
    channels_last = bool(weights) and weights[0].is_contiguous(memory_format=torch.channels_last)
    out = None
    for k in range(views):
        for start in range(0, n, batch):
            idx = torch.arange(start, min(start + batch, n))
            x = loader.views(idx, params[idx, k])
            if channels_last:  # the layout the teacher's weights are in
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits, _ = teacher(x.to(device))
            if out is None:
                out = torch.empty(n, views, logits.shape[1])
            out[idx, k] = logits.float().cpu()
    return out


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Store in the cache folder; a cache that cannot be written (no folder, full disk) only
    means the next run computes again."""
    try:  # atomic: runs of a sweep may build the same bank side by side
        file.parent.mkdir(parents=True, exist_ok=True)
        with replacing(file, durable=False) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    except OSError:
        pass


class CachedViews:
    """A MemoryLoader whose training views come from the bank: each image draws one of its
    stored views per epoch, and the batch's teacher logits go into ``slot``."""

    def __init__(self, loader: MemoryLoader, bank: Bank, slot: Slot) -> None:
        self.loader, self.bank, self.slot = loader, bank, slot
        self.sampler, self.generator = loader.sampler, loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        views = self.bank.params.shape[1]
        device = self.loader.device
        for idx in self.loader.batches():
            k = torch.randint(views, (len(idx),), generator=self.generator)
            x = self.loader.views(idx, self.bank.params[idx, k])
            self.slot.logits = [
                None if t is None else t[idx, k].to(device, non_blocking=True)
                for t in self.bank.logits
            ]
            yield x, self.loader.targets[idx]


def cached_value(
    cache_dir: Path | None, key: str, compute: Callable[[], float]
) -> tuple[float, bool]:
    """A number (e.g. a teacher's val accuracy) remembered under ``key``; (value, was_cached).
    With no usable cache folder (None) it is computed every time."""
    if cache_dir is None:
        return compute(), False
    file = cache_dir / "teacher" / "values.json"
    try:
        known = json.loads(file.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key], True
    value = compute()
    known[key] = value
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with replacing(file, durable=False) as tmp:
            tmp.write_text(json.dumps(known, indent=1))
    except OSError:  # not remembered: measured again next time
        pass
    return value, False
