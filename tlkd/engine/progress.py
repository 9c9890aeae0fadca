"""Progress: a rich progress bar on a terminal, plain log lines otherwise (CI logs, files)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """Shows training progress. ``interactive=None`` decides by whether stdout is a terminal."""

    def __init__(self, log_every: int = 50, interactive: bool | None = None, quiet: bool = False):
        self.console = Console(highlight=False)
        self.interactive = self.console.is_terminal if interactive is None else interactive
        self.log_every = log_every
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task = None
        self._epoch = self._epochs = self._steps = 0

    def print(self, text: str) -> None:
        if not self.quiet:
            if self.interactive:
                self.console.print(text)
            else:
                print(text, flush=True)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch, self._epochs, self._steps = epoch, epochs, steps
        self._t0 = time.perf_counter()
        if self.quiet or not self.interactive:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, stats="")

    def step(self, step: int, images: int, loss: float, top1: float) -> None:
        rate = images / max(time.perf_counter() - self._t0, 1e-9)
        stats = f"loss {loss:.4f}  acc {top1:5.1f}%  {rate:6.0f} img/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif not self.quiet and (step % self.log_every == 0 or step == self._steps):
            print(
                f"epoch {self._epoch}/{self._epochs} step {step}/{self._steps}  {stats}",
                file=sys.stdout,
                flush=True,
            )

    def epoch_end(self, row: dict, best: bool) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        parts = "".join(
            f"  {k.removeprefix('train_loss_')} {v:.4f}"
            for k, v in row.items()
            if k.startswith("train_loss_")
        )
        val = "".join(
            f"{name} {_fmt(row.get(name), fmt)}  "
            for name, fmt in (("val_loss", ".4f"), ("val_top1", ".2f%"), ("val_top5", ".2f%"))
            if row.get(name) is not None
        )
        self.print(
            f"epoch {row['epoch']}/{self._epochs}  train_loss {_fmt(row['train_loss'], '.4f')}"
            f"{parts}  {val}lr {_fmt(row['lr'], '.2e')}  {row['epoch_time_s']:.1f}s  "
            f"{_fmt(row['train_img_per_s'], '.0f')} img/s" + ("  *best*" if best else "")
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _fmt(value, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt.endswith("%"):
        return f"{value:{fmt[:-1]}}%"
    return f"{value:{fmt}}"
