"""The run directory: where a run's config, metrics, weights and checkpoints live.

Every file is written atomically (temporary file in the same folder, fsync, rename), so a run
killed at any moment leaves each file either complete and old or complete and new.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
import yaml
from safetensors.torch import save as safetensors_bytes

from tlkd.errors import ConfigError, TlkdError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
WEIGHTS = "model.safetensors"
START = "start.safetensors"  # finetune from pretrained weights: the weights training started from
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
CURVES = "curves.png"
EVAL = "eval.json"


@contextlib.contextmanager
def replacing(path: Path, durable: bool = True) -> Iterator[Path]:
    """The one atomic write: yields a fresh temporary path in ``path``'s folder for the body
    to write (``open``, ``torch.save``, ``np.save``, ``safetensors``), then renames it over
    ``path``, so readers see the old file or the new one, never half of one. On any error the
    temporary file is removed and the error (an OSError as it is) propagates; ``path`` is
    untouched. ``durable``: fsync the file before and its folder after the rename (run files;
    caches, which are rebuilt when lost, skip it)."""
    # a name no other writer (process or thread) picks; the body creates the file, with the
    # permissions any new file gets (umask)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` (see :func:`replacing`). An OSError (a full
    disk, a folder gone read-only) becomes one TlkdError line naming the file; the file it
    would have replaced is untouched."""
    try:
        with replacing(path) as tmp, open(tmp, "wb") as f:
            write(f)
    except OSError as err:
        raise write_error(path, err) from None


def write_error(path: Path, err: OSError) -> TlkdError:
    """``could not write PATH: No space left on device`` (exit 1)."""
    reason = err.strerror or str(err) or type(err).__name__
    return TlkdError(f"could not write {path}: {reason}")


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (made if missing), or None when they can: a
    file is created and removed, which is what counts (permissions alone say nothing to root,
    read-only mounts or full disks)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tlkd-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def check_output_dir(folder: Path, key: str = "output_dir", write: bool = True) -> None:
    """Fail before anything is built when run folders cannot be made in ``folder``: with
    ``write`` the folder is made and a file written in it, then both removed again; without,
    the nearest existing folder above it must be a writable folder (dry runs)."""
    if write:
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        reason = unwritable(folder)
        for p in made:  # deepest first: nothing is left behind by the check
            with contextlib.suppress(OSError):
                p.rmdir()
        if reason is not None:
            raise ConfigError(key, f"cannot write run folders in {folder}: {reason}")
        return
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"cannot write run folders in {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, f"cannot write run folders in {folder}: {existing} is read-only")


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


class RunDir:
    """A run's folder. :meth:`create` never reuses a folder: ``name``, then ``name-2``, ..."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, output_dir: Path, name: str) -> RunDir:
        output_dir.mkdir(parents=True, exist_ok=True)
        for n in range(1, 100_000):
            path = output_dir / (name if n == 1 else f"{name}-{n}")
            try:
                path.mkdir()  # atomic: two runs racing for a name get different folders
            except FileExistsError:
                continue
            return cls(path)
        raise RuntimeError(f"no free run directory name for {name} in {output_dir}")

    def file(self, name: str) -> Path:
        return self.path / name

    def save_config(self, data: dict[str, Any]) -> None:
        write_text(self.file(CONFIG), yaml.safe_dump(data, sort_keys=False))

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite metrics.jsonl, one JSON object per epoch, atomically."""
        write_text(self.file(METRICS), "".join(json.dumps(r) + "\n" for r in history))

    def save_weights(
        self, state: dict[str, torch.Tensor], metadata: dict[str, str], name: str = WEIGHTS
    ) -> None:
        atomic_write(self.file(name), lambda f: f.write(safetensors_bytes(state, metadata)))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write checkpoint.pt; the one it replaces is kept as checkpoint.prev.pt, so a valid
        checkpoint exists at every moment, even if the process dies mid-write."""
        current, previous = self.file(CHECKPOINT), self.file(PREVIOUS_CHECKPOINT)

        def write(f: BinaryIO) -> None:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
            if current.exists():
                os.replace(current, previous)

        atomic_write(current, write)

    def finish_checkpoints(self, keep: bool) -> None:
        """A finished run: drop checkpoint.prev.pt, and checkpoint.pt unless ``keep``."""
        names = [PREVIOUS_CHECKPOINT] + ([] if keep else [CHECKPOINT])
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                self.file(name).unlink()

    def load_checkpoint(self) -> tuple[dict[str, Any], str]:
        """The newest readable checkpoint (weights_only=True) and a note on what was used."""
        errors = []
        for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
            path = self.file(name)
            if not path.exists():
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - truncated, corrupt, or not a checkpoint
                errors.append(f"{name} is unreadable ({type(err).__name__})")
                continue
            if not isinstance(state, dict) or "epoch" not in state:
                errors.append(f"{name} is not a tlkd checkpoint")
                continue
            return state, "; ".join(errors + [f"resuming from {name}"])
        why = f" ({'; '.join(errors)})" if errors else ""
        if not errors and _finished(self.file(SUMMARY)):
            why = " (it finished with train.keep_checkpoint: false, the default in sweeps)"
        raise TlkdError(f"{self.path}: no usable checkpoint to resume from{why}")


def _finished(summary: Path) -> bool:
    try:
        return json.loads(summary.read_text()).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False
