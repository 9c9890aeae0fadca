"""The in-memory data path: decode a dataset once into one uint8 tensor, keep it on disk
between runs, and serve batches augmented on whole tensors (no per-image worker processes).

Chosen by ``data.in_memory`` (auto: when the images fit the memory budget and the augmentation
runs on batches; over the budget they are memory-mapped from the cache folder). Training images
are stored as decoded (JPEGs at the reduced scale of ``data.jpeg_draft``): in one (N, 3, H, W)
tensor when they share a size, else back to back in a ``Ragged`` store; val images are stored
after the eval resize/crop (deterministic, one size), so only normalisation remains.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tlkd.data.batch_aug import BatchAugment, normalize
from tlkd.data.datasets import LabeledImages
from tlkd.data.ragged import Ragged
from tlkd.run.rundir import replacing

CACHE_VERSION = 1
MEMORY_FRACTION = 0.4  # of the memory available when the run starts


class NotUniform(Exception):
    """Training images of more than one size: they cannot share one tensor."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("TLKD_CACHE_DIR", "~/.cache/tlkd")).expanduser()


_warned: set[str] = set()  # one warning per folder and process (a sweep warns once)


def usable_cache_dir(configured: Path | None) -> Path | None:
    """The cache folder (``data.cache_dir``, else $TLKD_CACHE_DIR, else ~/.cache/tlkd) when it
    can be written, else None: the run goes on without a disk cache (images decoded in memory
    each run, auto-tuning measured again), after one warning line naming the folder and what
    moves it. A home folder that does not exist is not created."""
    home_missing = False
    if configured is not None:
        folder, moved_by = Path(configured).expanduser(), "data.cache_dir"
    elif os.environ.get("TLKD_CACHE_DIR"):
        folder, moved_by = Path(os.environ["TLKD_CACHE_DIR"]).expanduser(), "TLKD_CACHE_DIR"
    else:
        moved_by = "TLKD_CACHE_DIR or data.cache_dir"
        try:
            home = Path.home()
        except (RuntimeError, KeyError):  # no HOME and no password entry
            home = Path("~")
        folder = home / ".cache" / "tlkd"
        home_missing = not home.is_dir()
    problem = "the home folder does not exist" if home_missing else None
    if problem is None:
        from tlkd.run.rundir import unwritable

        problem = unwritable(folder)
    if problem is None:
        return folder
    if str(folder) not in _warned:
        _warned.add(str(folder))
        _warn_cache(folder, problem, moved_by)
    return None


def _warn_cache(folder: Path, problem: str, moved_by: str) -> None:
    from tlkd.engine import distributed

    if distributed.info().is_main:
        print(
            f"warning: cache folder {folder} is not usable ({problem}); running without a disk "
            f"cache (images decoded again, auto-tuning not remembered); set {moved_by} to a "
            "writable folder",
            file=sys.stderr,
            flush=True,
        )


def available_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 4 GiB
        return 4 << 30


def estimate_bytes(ds: LabeledImages, pil_tf: Callable | None) -> int:
    """Size of ``ds`` as uint8 tensors, judged by its first image."""
    if len(ds) == 0:
        return 0
    img, _ = ds[0]
    if pil_tf is not None:
        img = pil_tf(img)
    w, h = img.size
    return len(ds) * w * h * 3


class _Decoded(Dataset):
    def __init__(self, ds: LabeledImages, pil_tf: Callable | None) -> None:
        self.ds, self.pil_tf = ds, pil_tf

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> np.ndarray:
        img, _ = self.ds[i]
        if self.pil_tf is not None:
            img = self.pil_tf(img)
        return np.asarray(img, dtype=np.uint8)


def _as_list(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return arrays


def _file_key(ds: LabeledImages, tag: str) -> str | None:
    """Digest of the files behind ``ds`` (paths, sizes, mtimes) and ``tag``; None when ``ds``
    is not file-backed (those datasets are already arrays: decoded per run, not cached)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{tag}".encode())
    for i in range(len(ds)):
        path = ds.path(i)
        if path is None:
            return None
        st = os.stat(path)
        h.update(f"|{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_images(
    ds: LabeledImages,
    pil_tf: Callable | None,
    tag: str,
    cache_dir: Path | None,
    workers: int,
    log: Callable[[str], None] = print,
    mapped: bool = False,
    ragged: bool = False,
) -> torch.Tensor | Ragged:
    """``ds`` as one uint8 (N, 3, H, W) tensor, from ``cache_dir`` when decoded before.
    ``pil_tf`` (a deterministic PIL transform, e.g. the eval resize/crop) runs before storing.
    ``mapped``: the tensor is the cache file memory-mapped (copy-on-write), not read into
    memory, and decoding writes straight into that file: data larger than the memory budget
    (needs a usable ``cache_dir``). Images of several sizes raise NotUniform, or with
    ``ragged`` are decoded again into a Ragged store (cached and mapped alike)."""
    key = _file_key(ds, tag)
    path = cache_dir / "images" / f"{key}.npy" if key and cache_dir is not None else None
    if mapped and path is None:
        raise ValueError("a memory-mapped dataset needs a file-backed dataset and a cache folder")
    stores = [(path, _read), (_ragged_paths(path)[0], _read_ragged)] if path else []
    for found, read in stores[: 2 if ragged else 1]:
        if found is not None and found.exists():
            try:
                return read(found, mapped)
            except (OSError, ValueError):  # torn or foreign file: decode again
                pass
    if len(ds) == 0:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    log(
        f"decoding {len(ds)} images {'to a memory-mapped file' if mapped else 'into memory'}"
        + (f" (cache {path})" if path else "")
    )
    job = _Decoding(ds, pil_tf, path, workers, log, mapped)
    try:
        return _load_uniform(job)
    except NotUniform as err:
        if not ragged:
            raise
        log(f"the images differ in size ({err}): decoding them again, each at its own size")
        return _load_ragged(job)


@dataclass(frozen=True)
class _Decoding:
    """What load_images decodes, and where to: the cache file ``path`` (None: memory only)."""

    ds: LabeledImages
    pil_tf: Callable | None
    path: Path | None
    workers: int
    log: Callable[[str], None]
    mapped: bool


def _load_uniform(job: _Decoding) -> torch.Tensor:
    ds, pil_tf, path, workers, log = job.ds, job.pil_tf, job.path, job.workers, job.log
    if not job.mapped:
        out = _decode(ds, pil_tf, workers, lambda shape: np.empty(shape, np.uint8))
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # atomic: concurrent runs never read half a file
                with replacing(path, durable=False) as tmp, open(tmp, "wb") as f:
                    np.save(f, out, allow_pickle=False)
            except OSError as err:  # a full disk: the decoded images are in memory all the same
                log(f"warning: could not cache the decoded images in {path.parent}: {err.strerror}")
        return torch.from_numpy(out)
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, durable=False) as tmp:  # written in place, renamed when complete

        def create(shape: tuple[int, ...]) -> np.ndarray:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            # the file is sparse: reserve its blocks now, so a full disk is an OSError here
            # and not a SIGBUS when a page is written later
            if hasattr(os, "posix_fallocate"):
                fd = os.open(tmp, os.O_RDWR)
                try:
                    os.posix_fallocate(fd, 0, os.path.getsize(tmp))
                finally:
                    os.close(fd)
            return arr

        out = _decode(ds, pil_tf, workers, create)
        out.flush()
        del out
    return _read(path, mapped=True)


def _read(path: Path, mapped: bool) -> torch.Tensor:
    # "c": copy-on-write pages, so torch gets a writable array and nothing reaches the file
    return torch.from_numpy(np.load(path, mmap_mode="c" if mapped else None, allow_pickle=False))


def _ragged_paths(path: Path) -> tuple[Path, Path]:
    """The index and data files of the Ragged store cached under the name of ``path``."""
    return path.with_suffix(".ragged.npy"), path.with_suffix(".ragged.u8")


def _read_ragged(index_path: Path, mapped: bool) -> Ragged:
    index = np.load(index_path, allow_pickle=False)
    data_path = index_path.with_suffix(".u8")
    if index.ndim != 2 or index.shape[1] != 4:
        raise ValueError(f"{index_path} is not an index of images")
    if os.path.getsize(data_path) != int((index[:, 1] * index[:, 2] * index[:, 3]).sum()):
        raise ValueError(f"{data_path} does not match its index")
    # "c": copy-on-write pages, as _read
    data = np.memmap(data_path, np.uint8, "c") if mapped else np.fromfile(data_path, np.uint8)
    return Ragged(torch.from_numpy(data), torch.from_numpy(index))


def _load_ragged(job: _Decoding) -> Ragged:
    """``job.ds`` decoded image by image, each at its own size, written back to back: into the
    cache folder when there is one (read back whole, or memory-mapped), else in memory."""
    ds, pil_tf, path, workers = job.ds, job.pil_tf, job.path, job.workers
    rows: list[tuple[int, int, int, int]] = []
    offset = 0

    def record(arr: np.ndarray) -> np.ndarray:
        nonlocal offset
        chw = np.ascontiguousarray(arr.transpose(2, 0, 1))
        rows.append((offset, *chw.shape))
        offset += chw.size
        return chw

    if path is None:
        chunks = [record(arr) for arr in _arrays(ds, pil_tf, workers)]
        data = np.concatenate([c.reshape(-1) for c in chunks]) if chunks else np.zeros(0, np.uint8)
        return Ragged(torch.from_numpy(data), torch.tensor(rows, dtype=torch.long))
    index_path, data_path = _ragged_paths(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # no room for them (judged by the first image): fail now, not after decoding for hours
        if shutil.disk_usage(path.parent).free < estimate_bytes(ds, pil_tf):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        # the data first, then the index: a store is complete when its index exists
        with replacing(data_path, durable=False) as tmp, open(tmp, "wb") as f:
            for arr in _arrays(ds, pil_tf, workers):
                f.write(record(arr).tobytes())
        with replacing(index_path, durable=False) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(rows, dtype=np.int64), allow_pickle=False)
    except OSError as err:
        if job.mapped:
            raise
        job.log(f"warning: could not cache the decoded images in {path.parent}: {err.strerror}")
        return _load_ragged(replace(job, path=None))
    return _read_ragged(index_path, job.mapped)


def _arrays(ds: LabeledImages, pil_tf: Callable | None, workers: int) -> Iterator[np.ndarray]:
    """Every image of ``ds`` as an (H, W, 3) uint8 array, in order, decoded by ``workers``."""
    # its own generator: decoding (done or found in the cache) must not move the global RNG,
    # or what is initialised after it (heads of objectives, discriminators) would differ
    # between a run that decodes and one that reads the cache
    loader = DataLoader(
        _Decoded(ds, pil_tf), batch_size=256, num_workers=workers, collate_fn=_as_list,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for batch in loader:
        for arr in batch:
            yield np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr


def _decode(
    ds: LabeledImages,
    pil_tf: Callable | None,
    workers: int,
    create: Callable[[tuple[int, ...]], np.ndarray],
) -> np.ndarray:
    """Every image of ``ds`` into one (N, 3, H, W) uint8 array made by ``create(shape)`` when
    the first image gives the shape."""
    out: np.ndarray | None = None
    for pos, arr in enumerate(_arrays(ds, pil_tf, workers)):
        if out is None:
            out = create((len(ds), arr.shape[2], arr.shape[0], arr.shape[1]))
        if arr.shape != (out.shape[2], out.shape[3], out.shape[1]):
            raise NotUniform(f"{arr.shape[1]}x{arr.shape[0]} and {out.shape[3]}x{out.shape[2]}")
        out[pos] = arr.transpose(2, 0, 1)
    assert out is not None
    return out


@dataclass
class MemoryLoader:
    """Batches of ``images[indices]`` with targets: augmented (train) or normalised (eval).

    Has what the trainer uses of a DataLoader: ``sampler`` (with set_epoch), ``generator``
    (its state at the epoch start replays the epoch's augmentation on resume) and ``len``.
    """

    images: torch.Tensor | Ragged  # uint8 (N, 3, H, W), or of several sizes (training only)
    targets: torch.Tensor  # int64 (N,)
    sampler: Sequence[int] | torch.utils.data.Sampler
    batch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: BatchAugment | None = None
    generator: torch.Generator | None = None
    device: torch.device = torch.device("cpu")
    drop_last: bool = False

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self) -> Iterator[torch.Tensor]:
        """Index tensors of the batches, in order."""
        idx = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield idx[start : start + self.batch_size]

    def views(self, idx: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """The batch ``idx`` as model input; random views unless ``params`` fixes them."""
        images = self.images
        if isinstance(images, Ragged):  # cut on the host, the batch copied to the device
            assert self.augment is not None, "a Ragged store holds training images"
            if params is None:
                h, w = images.sizes(idx)
                params = self.augment.sample(len(idx), h, w, self.generator)
            return self.augment.apply(images, params, idx).to(self.device, non_blocking=True)
        if self.augment is not None and self.device == images.device:
            if params is None:
                h, w = images.shape[2:]
                params = self.augment.sample(len(idx), h, w, self.generator)
            return self.augment.apply(images, params, idx)
        x = self.images[idx.to(self.images.device)]
        if x.device != self.device:  # host images for an accelerator: one copy per batch
            x = x.pin_memory().to(self.device, non_blocking=True)
        if self.augment is None:
            return normalize(x, self.mean, self.std)
        if params is None:
            params = self.augment.sample(len(idx), x.shape[2], x.shape[3], self.generator)
        return self.augment.apply(x, params)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.batches():
            yield self.views(idx), self.targets[idx]


DEVICE_FRACTION = 0.25  # of the accelerator's free memory the images may take there


def to_device(images: list[torch.Tensor | Ragged], device: torch.device) -> list:
    """``images`` moved onto ``device`` (a GPU) when together they take at most
    DEVICE_FRACTION of its free memory (the rest is the model's, its teachers' and the
    activations'), so batches are gathered and augmented there with no copy per step; else as
    they are (host memory, copied a batch at a time). A Ragged store stays on the host (its
    views are cut there, image by image)."""
    if any(isinstance(x, Ragged) for x in images):
        return [x if isinstance(x, Ragged) else to_device([x], device)[0] for x in images]
    if device.type != "cuda" or all(x.device == device for x in images):
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if sum(x.numel() * x.element_size() for x in images) > DEVICE_FRACTION * free:
        return images
    return [x.to(device) for x in images]


def pil_stage(eval_tf: Callable) -> Callable:
    """The PIL part of a timm eval transform (resize, crop): everything before ToTensor."""
    steps = list(getattr(eval_tf, "transforms", []))
    cut = next((i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__), len(steps))
    from torchvision.transforms import Compose

    return Compose(steps[:cut])
