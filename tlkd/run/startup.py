"""A training run's fixed start-up cost: the seconds from the command's start to its first
training step, by phase (imports, config, data, model, auto timing, decoding, ...). Shown in
the plan and kept in summary.json (``startup_s``), so a slow start names its cause.

One clock per run: the CLI starts it before the heavy imports and the command's first build
times its phases on it; every later build (the runs of a sweep after its checks, a run started
from Python) starts its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class Startup:
    """Phases timed since ``t0`` until the first training step."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.first_step: float | None = None
        self.built = False  # a build has timed its phases on this clock

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase; ``to_first_step`` and ``other`` (the rest) once training began."""
        out = {k: round(v, 2) for k, v in self.phases.items()}
        if self.first_step is not None:
            out["other"] = round(max(0.0, self.first_step - sum(self.phases.values())), 2)
            out["to_first_step"] = round(self.first_step, 2)
        return out

    def line(self) -> str:
        """The plan line: the phases so far, largest first."""
        total = time.perf_counter() - self.t0
        parts = sorted(self.phases.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in parts if v >= 0.05)
        return f"start-up    {total:.1f} s so far ({shown or 'nothing measurable'})"


_CURRENT: ContextVar[Startup | None] = ContextVar("tlkd_startup", default=None)


def begin() -> Startup:
    """A new clock for the run this command (or context) starts."""
    clock = Startup()
    _CURRENT.set(clock)
    return clock


def for_build() -> Startup:
    """The clock a build times its phases on: the command's own for its first build (it holds
    the imports and the config), a new one for each later build (the runs of a sweep, after
    its checks), so every run's figures are its own."""
    clock = _CURRENT.get()
    if clock is None or clock.built:
        clock = begin()
    clock.built = True
    return clock


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time ``name`` on the running clock (nothing when no clock runs)."""
    clock = _CURRENT.get()
    if clock is None:
        yield
        return
    with clock.phase(name):
        yield


def first_step() -> None:
    """Training began: the clock stops, and the next run in this process starts its own."""
    clock = _CURRENT.get()
    if clock is not None and clock.first_step is None:
        clock.first_step = time.perf_counter() - clock.t0
        _CURRENT.set(None)
