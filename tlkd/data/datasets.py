"""Labelled image datasets: image folders, torchvision's built-ins and the embedded digits.

Every dataset here yields ``(PIL RGB image, int label)`` and knows its ``classes`` and
``targets``; class subsets, held-out val splits and few-label selection are index views
over them, so nothing is copied or decoded ahead of time.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from tlkd.config.schema import DataConfig
from tlkd.config.suggest import did_you_mean
from tlkd.data.catalog import TORCHVISION_DATASETS
from tlkd.data.decode import ImageLoader
from tlkd.errors import BadImageError, ConfigError


class LabeledImages(Dataset):
    """A view of ``base`` through ``indices`` with labels remapped by ``label_map``."""

    def __init__(
        self,
        base: Dataset,
        targets: Sequence[int],
        classes: list[str],
        indices: Sequence[int] | None = None,
        label_map: dict[int, int] | None = None,
    ) -> None:
        self.base = base
        self.indices = list(range(len(targets))) if indices is None else list(indices)
        self.label_map = label_map
        self.classes = classes
        self._base_targets = targets
        self.targets = [self._map(int(targets[i])) for i in self.indices]

    def _map(self, y: int) -> int:
        return y if self.label_map is None else self.label_map[y]

    def view(self, indices: Sequence[int]) -> LabeledImages:
        """A sub-view by positions within this view."""
        return LabeledImages(
            self.base,
            self._base_targets,
            self.classes,
            [self.indices[i] for i in indices],
            self.label_map,
        )

    def __len__(self) -> int:
        return len(self.indices)

    def path(self, i: int) -> str | None:
        """The file behind item ``i`` (None for in-memory datasets)."""
        samples = getattr(self.base, "samples", None)
        return samples[self.indices[i]][0] if samples is not None else None

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        try:
            img, y = self.base[self.indices[i]]
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for bad files
            raise BadImageError(
                f"cannot read image {self.path(i) or f'#{self.indices[i]}'}: {err} "
                "(set data.skip_bad_images: true to skip unreadable images)"
            ) from None
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return img, self._map(int(y))


class EmbeddedDigits(Dataset):
    """UCI handwritten digits (8x8, 1,797 images) shipped inside the package: the default
    dataset, needing no download. See tlkd/data/embedded/README.md."""

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str) -> None:
        ref = importlib.resources.files("tlkd.data") / "embedded" / "digits.npz"
        with importlib.resources.as_file(ref) as path, np.load(path) as arrays:
            self.images = arrays[f"{split}_x"]
            self.targets = arrays[f"{split}_y"].tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L"), self.targets[i]


class UnlabeledFolder(Dataset):
    """Every image file under ``root`` (any depth; class sub-folders, if any, are ignored),
    sorted, with label -1."""

    def __init__(self, root: Path) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        exts = tuple(e.lower() for e in IMG_EXTENSIONS)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        self.samples = [(str(p), -1) for p in files]
        self.targets = [-1] * len(files)
        self.loader = ImageLoader()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.loader(self.samples[i][0]), -1


def unlabeled(
    path: Path, limit: int | None = None, seed: int = 0, key: str = "data.unlabeled"
) -> LabeledImages:
    """An image folder whose labels are ignored (domain adaptation, self-supervision), in an
    order drawn with ``seed`` (see ``shuffled``); with ``limit``, the first that many."""
    if not path.is_dir():
        raise ConfigError(key, f"not a folder: {path}")
    ds = UnlabeledFolder(path)
    if not len(ds):
        raise ConfigError(key, f"no image files under {path}")
    images = shuffled(LabeledImages(ds, ds.targets, []), seed)
    return images.view(range(limit)) if limit is not None and limit < len(ds) else images


def shuffled(images: LabeledImages, seed: int) -> LabeledImages:
    """``images`` in a fixed random order drawn with ``seed``. A folder lists its images class
    by class; a pass over it in that order feeds BatchNorm batches of one class, whose
    statistics lack the between-class spread (AdaBN's cumulative statistics come out too
    narrow; Tent, normalising each batch with its own, normalises the class away). Shuffled,
    each batch mixes the classes as a random sample of the set does."""
    return images.view(np.random.default_rng(seed).permutation(len(images)).tolist())


@dataclass
class Splits:
    train: LabeledImages
    val: LabeledImages
    classes: list[str]
    val_source: str  # where val came from, for the plan
    bad_images: list[str] = field(default_factory=list)  # skipped: unreadable


def build_splits(cfg: DataConfig, seed: int) -> Splits:
    """Build train/val as the config says: source, class subset, val split, few labels."""
    train, val = _sources(cfg)
    classes = train.classes
    if cfg.classes is not None:
        train = _keep_classes(train, cfg.classes)
        val = None if val is None else _keep_classes(val, cfg.classes)
        classes = list(cfg.classes)
    rng = np.random.default_rng(seed)
    val_source = {"folder": "data.val", "digits": "embedded val split"}.get(
        cfg.dataset, f"{cfg.dataset} test split"
    )
    if val is None:
        train, val = _split(train, cfg.val_fraction, rng)
        val_source = f"{cfg.val_fraction:g} of train, held out (seed {seed})"
    # no training images: evaluation only (evaluate with data.val=...), nothing to subset
    if (cfg.samples_per_class is not None or cfg.fraction is not None) and len(train):
        train = _few_labels(train, cfg.samples_per_class, cfg.fraction, rng)
    bad: list[str] = []
    if cfg.skip_bad_images:
        train, bad_train = drop_unreadable(train)
        val, bad_val = drop_unreadable(val)
        bad = bad_train + bad_val
    return Splits(train, val, classes, val_source, bad)


def drop_unreadable(ds: LabeledImages) -> tuple[LabeledImages, list[str]]:
    """Decode every image file once and leave out those that fail (named in the result)."""
    keep, bad = [], []
    for i in range(len(ds)):
        path = ds.path(i)
        if path is not None:
            try:
                with Image.open(path) as img:
                    img.load()
            except (OSError, ValueError, SyntaxError):
                bad.append(path)
                continue
        keep.append(i)
    return (ds.view(keep) if bad else ds), bad


def _sources(cfg: DataConfig) -> tuple[LabeledImages, LabeledImages | None]:
    if cfg.dataset == "digits":
        return _wrap(EmbeddedDigits("train")), _wrap(EmbeddedDigits("val"))
    if cfg.dataset == "folder":
        val = labeled_folder(cfg.val, "data.val") if cfg.val is not None else None
        if cfg.train is None:  # evaluation only: no training images
            return val.view([]), val
        train = labeled_folder(cfg.train, "data.train")
        if val is not None and val.classes != train.classes:
            missing = sorted(set(train.classes) - set(val.classes))
            extra = sorted(set(val.classes) - set(train.classes))
            raise ConfigError(
                "data.val",
                f"class folders differ from data.train's (missing: {missing or '-'}, "
                f"extra: {extra or '-'})",
            )
        return train, val
    return _torchvision(cfg, train=True), _torchvision(cfg, train=False)


def _wrap(ds: Dataset, labels_attr: str = "targets") -> LabeledImages:
    targets = [int(t) for t in getattr(ds, labels_attr)]
    classes = getattr(ds, "classes", None) or [str(i) for i in range(max(targets) + 1)]
    return LabeledImages(ds, targets, [str(c) for c in classes])


def labeled_folder(path: Path, key: str) -> LabeledImages:
    """An image folder with one sub-folder per class; errors name the config ``key``."""
    from torchvision.datasets import ImageFolder

    if not path.exists():
        raise ConfigError(key, f"path does not exist: {path}")
    if not path.is_dir():
        raise ConfigError(key, f"not a folder: {path}")
    try:
        ds = ImageFolder(str(path), loader=ImageLoader())
    except FileNotFoundError as err:
        # torchvision: "Couldn't find any class folder in ..." / "Found no valid file for the
        # classes cat. Supported extensions are: ..."
        raise ConfigError(key, f"{err} ({path})") from None
    return _wrap(ds)


def _torchvision(cfg: DataConfig, train: bool) -> LabeledImages:
    import torchvision.datasets as tvd

    cls_name, train_kw, val_kw, labels_attr = TORCHVISION_DATASETS[cfg.dataset]
    root = cfg.root / cfg.dataset
    try:
        ds = getattr(tvd, cls_name)(
            str(root), download=cfg.download, **(train_kw if train else val_kw)
        )
    except RuntimeError as err:
        if cfg.download:
            raise ConfigError("data.download", f"could not download {cfg.dataset}: {err}") from None
        raise ConfigError(
            "data.root",
            f"{cfg.dataset} not found under {root}; set data.download: true to fetch it",
        ) from None
    return _wrap(ds, labels_attr)


def _keep_classes(ds: LabeledImages, keep: list[str]) -> LabeledImages:
    for name in keep:
        if name not in ds.classes:
            raise ConfigError(
                "data.classes", f"no class {name!r} in the data{did_you_mean(name, ds.classes)}"
            )
    # sources carry no label map yet, so base labels map straight to the new order
    label_map = {ds.classes.index(name): new for new, name in enumerate(keep)}
    indices = [ds.indices[i] for i, y in enumerate(ds.targets) if y in label_map]
    return LabeledImages(ds.base, ds._base_targets, list(keep), indices, label_map)


def _per_class(ds: LabeledImages) -> dict[int, np.ndarray]:
    targets = np.asarray(ds.targets)
    return {c: np.flatnonzero(targets == c) for c in range(len(ds.classes))}


def _split(
    ds: LabeledImages, fraction: float, rng: np.random.Generator
) -> tuple[LabeledImages, LabeledImages]:
    """Stratified, seeded hold-out split."""
    train_idx, val_idx = [], []
    for idx in _per_class(ds).values():
        idx = rng.permutation(idx)
        n_val = min(max(1, round(len(idx) * fraction)), len(idx) - 1) if len(idx) > 1 else 0
        val_idx += idx[:n_val].tolist()
        train_idx += idx[n_val:].tolist()
    return ds.view(sorted(train_idx)), ds.view(sorted(val_idx))


def _few_labels(
    ds: LabeledImages, per_class: int | None, fraction: float | None, rng: np.random.Generator
) -> LabeledImages:
    keep = []
    for c, idx in _per_class(ds).items():
        n = per_class if per_class is not None else max(1, round(len(idx) * fraction))
        if n > len(idx):
            raise ConfigError(
                "data.samples_per_class",
                f"class {ds.classes[c]!r} has only {len(idx)} training images, asked for {n}",
            )
        keep += rng.permutation(idx)[:n].tolist()
    return ds.view(sorted(keep))
