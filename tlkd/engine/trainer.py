"""The training loop every mode runs: an objective gives each batch's loss, the loop does the
rest (precision, accumulation, clipping, scheduling, validation, run files)."""

from __future__ import annotations

import math
import random
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tlkd.config.schema import TrainConfig
from tlkd.engine import distributed
from tlkd.engine.device import autocast
from tlkd.engine.inference import predict
from tlkd.engine.objectives import Objective
from tlkd.engine.progress import Reporter
from tlkd.errors import TlkdError
from tlkd.models.factory import state_dict_for_save
from tlkd.models.freeze import Freezer
from tlkd.run import startup
from tlkd.run.plots import plot_curves
from tlkd.run.rundir import CURVES, RunDir


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_top1: float = -1.0
    best_epoch: int = 0
    wall_time_s: float = 0.0
    skipped_steps: int = 0  # steps skipped for a NaN/Inf loss


class Trainable(nn.Module):
    """Model and objective as one module, so DistributedDataParallel sees the whole step
    (including feature taps and adapters) and synchronises every trained parameter."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        out = self.objective(self.model, images, targets)
        return out.loss, out.logits, out.parts


class Trainer:
    """Trains ``model`` on ``objective`` for ``cfg.epochs`` epochs and writes the run files."""

    def __init__(
        self,
        *,
        model: nn.Module,
        objective: Objective,
        freezer: Freezer,
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None,
        train_loader: DataLoader,
        val_loader: DataLoader,
        device: torch.device,
        dtype: torch.dtype | None,
        cfg: TrainConfig,
        unfreeze_after: int | None,
        run: RunDir,
        reporter: Reporter,
        weights_metadata: dict[str, str],
        on_epoch_end: Callable[[FitResult], None] | None = None,
    ) -> None:
        self.model, self.objective, self.freezer = model, objective, freezer
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.device, self.dtype, self.cfg = device, dtype, cfg
        self.unfreeze_after = unfreeze_after
        self.run, self.reporter = run, reporter
        self.weights_metadata = weights_metadata
        self.on_epoch_end = on_epoch_end
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.updates = 0
        # the run's optimizer steps as planned (objectives' per-update schedules, e.g. BYOL's)
        self.planned_updates = cfg.epochs * -(-len(train_loader) // cfg.accum_steps)
        self.skipped_steps = 0
        self.result = FitResult()
        self._partial: dict[str, Any] | None = None
        self._signals = StopSignals()
        self.dist = distributed.info()
        self._compiled: nn.Module | None = None
        self.step_module = self._wrap()

    def _wrap(self) -> nn.Module:
        """The module a training step calls: DDP-wrapped under torchrun. With train.compile
        the model inside it is torch.compile's wrapper (same parameters), so training steps
        run compiled while validation, checkpoints and hooks see the plain model. Calls an
        objective makes to other methods (forward_features, ...) run eager."""
        model = self.model
        if self.cfg.compile is True:
            if self._compiled is None:
                self._compiled = torch.compile(self.model)
            model = self._compiled
        trainable = Trainable(model, self.objective)
        if not self.dist.enabled:
            return trainable
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(trainable, device_ids=ids)

    def fit(self, start_epoch: int = 1) -> FitResult:
        t0 = time.perf_counter() - self.result.wall_time_s
        self._t0 = t0
        try:
            with StopSignals() as self._signals:
                for epoch in range(start_epoch, self.cfg.epochs + 1):
                    if self.unfreeze_after is not None and epoch == self.unfreeze_after + 1:
                        self.freezer.set_frozen(False)
                        self.step_module = self._wrap()  # DDP must see the new parameters
                        self.reporter.print(
                            f"epoch {epoch}: unfreezing {', '.join(self.freezer.prefixes)}"
                        )
                    row = self.train_epoch(epoch)
                    self.result.wall_time_s = time.perf_counter() - t0
                    self._end_epoch(epoch, row)
                    stop = distributed.any_rank(self._signals.received is not None)
                    if stop and epoch < self.cfg.epochs:
                        self._signals.received = self._signals.received or "SIGTERM"
                        raise Interrupted(
                            self._signals.received,
                            f"stopped by {self._signals.received} after epoch {epoch}; "
                            f"checkpoint written; continue with --resume {self.run.path}",
                        )
        finally:
            self.reporter.close()
        return self.result

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, device = self.cfg, self.device
        self.freezer.train_mode()
        self.objective.train()
        self.objective.start_epoch(epoch, cfg.epochs)
        steps = len(self.train_loader)
        self.reporter.epoch_start(epoch, cfg.epochs, steps)
        sums: dict[str, float] = defaultdict(float)
        seen = correct = skip = 0
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        generator = self.train_loader.generator
        loader_state = generator.get_state() if generator is not None else None
        partial, self._partial = self._partial, None
        if partial is not None:  # resuming inside this epoch: replay its batch order
            if generator is not None:
                generator.set_state(partial["loader"])
                loader_state = partial["loader"]
            sums.update(partial["sums"])
            seen, correct, skip = partial["seen"], partial["correct"], partial["step"]
        t0 = time.perf_counter() - (partial["train_time"] if partial else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        for step, (images, targets) in enumerate(self.train_loader, start=1):
            if step <= skip:  # batches done before the interruption: drawn, not trained
                if step == skip:
                    _set_rng(partial["rng"])  # the RNGs as they were when it stopped
                continue
            startup.first_step()  # the start-up clock stops (summary.json startup_s)
            self.objective.start_step(step, steps)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, self.dtype):
                loss, logits, parts = self.step_module(images, targets)
            loss_value = loss.item()
            if distributed.any_rank(not math.isfinite(loss_value)):  # all ranks skip or stop
                self._nonfinite(loss_value, epoch, step)
                continue
            self.scaler.scale(loss / cfg.accum_steps).backward()
            if step % cfg.accum_steps == 0 or step == steps:
                self._optimizer_step()
            n = targets.shape[0]
            seen += n
            sums["train_loss"] += loss_value * n
            for name, part in parts.items():
                sums[f"train_loss_{name}"] += part.item() * n
            labelled = targets >= 0  # unlabelled rows (adapt, pretrain) have target -1
            sums["labelled"] += labelled.sum().item()
            if logits.shape[1] > 1:  # class scores (not pretrain's features)
                hits = logits.detach()[labelled].argmax(1) == targets[labelled]
                correct += hits.sum().item()
            top1 = 100.0 * correct / max(sums["labelled"], 1)
            self.reporter.step(step, seen, sums["train_loss"] / seen, top1)
            stop = distributed.any_rank(self._signals.received is not None)
            if stop and step % cfg.accum_steps == 0 and step < steps:
                self._signals.received = self._signals.received or "SIGTERM"
                partial = {
                    "epoch": epoch,
                    "step": step,
                    "sums": dict(sums),
                    "seen": seen,
                    "correct": correct,
                    "loader": loader_state,
                    "train_time": time.perf_counter() - t0,
                }
                self._stop(epoch, step, partial)
        train_time = time.perf_counter() - t0
        if self.scheduler is not None:
            self.scheduler.step(epoch)
        if self.dist.enabled:  # every rank's share of the epoch
            keys = sorted(sums)
            totals = distributed.all_sum([seen, correct, *(sums[k] for k in keys)])
            seen, correct = int(totals[0]), int(totals[1])
            sums = dict(zip(keys, totals[2:], strict=True))
        labelled = sums.pop("labelled", 0.0)
        row: dict[str, Any] = {"epoch": epoch}
        row.update({k: v / max(seen, 1) for k, v in sums.items()})
        row["train_top1"] = 100.0 * correct / labelled if labelled else None
        row.update(self.objective.train_metrics())
        row.update(val_loss=None, val_top1=None, val_top5=None)
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            row.update(self.validate())
        row.update(
            lr=max(g["lr"] for g in self.optimizer.param_groups if not g.get("fixed_lr")),
            epoch_time_s=time.perf_counter() - t0,
            train_img_per_s=seen / train_time,
        )
        return row

    def validate(self) -> dict[str, Any]:
        """val_loss/top1/top5 and the objective's own metrics, on every rank's share."""
        cfg = self.cfg
        self.objective.before_val(self.model)
        logits, val_targets = distributed.gather_cat(
            *predict(self.model, self.val_loader, self.device, self.dtype, cfg.channels_last)
        )
        val = self.objective.val_scores(logits, val_targets)
        row = {"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"]}
        row.update(self.objective.val_metrics(logits, val_targets))
        row.update(self.objective.extra_val(self.model))
        return row

    def validate_only(self) -> FitResult:
        """No training (train.epochs: 0, e.g. AdaBN on a trained model): one validation,
        recorded as epoch 0 with the run files an epoch writes."""
        t0 = time.perf_counter()
        row: dict[str, Any] = {"epoch": 0, "train_loss": None, "train_top1": None}
        row.update(self.validate())
        row.update(lr=None, epoch_time_s=time.perf_counter() - t0, train_img_per_s=None)
        self._end_epoch(0, row)
        self.result.wall_time_s = time.perf_counter() - t0
        return self.result

    def _optimizer_step(self) -> None:
        self.objective.before_update(self.model)
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.updates)
        self.objective.after_update(self.model, self.updates, self.planned_updates)

    def _end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        result = self.result
        result.history.append(row)
        best = row["val_top1"] is not None and row["val_top1"] > result.best_val_top1
        if best:
            result.best_val_top1, result.best_epoch = row["val_top1"], epoch
        if not self.dist.is_main:  # every rank keeps the same history; rank 0 writes files
            return
        if best:
            self.run.save_weights(state_dict_for_save(self.model), self.weights_metadata)
        self.run.write_metrics(result.history)
        self.run.save_checkpoint(self.checkpoint_state(epoch))
        plot_curves(result.history, self.run.file(CURVES))
        self.reporter.epoch_end(row, best)
        if self.on_epoch_end is not None:
            self.on_epoch_end(result)

    def restore(self, state: dict[str, Any]) -> int:
        """Continue from a checkpoint: every state the loop has, RNGs included, so the rest of
        the run is the one an uninterrupted run would have had. Returns the next epoch."""
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.updates = state["updates"]
        if self.scheduler is not None:
            # timm schedulers are functions of the update count; recomputing from it (rather
            # than loading their saved settings) keeps a resume with more epochs consistent
            self.scheduler.step_update(num_updates=self.updates)
        if self.freezer.prefixes:
            self.freezer.set_frozen(state["frozen"])
            self.step_module = self._wrap()  # DDP must see what trains now
        r = state["result"]
        self.result = FitResult(
            list(r["history"]), r["best_val_top1"], r["best_epoch"], r["wall_time_s"]
        )
        self.skipped_steps = self.result.skipped_steps = state.get("skipped_steps", 0)
        rng = state["rng"]
        if rng["loader"] is not None and self.train_loader.generator is not None:
            self.train_loader.generator.set_state(rng["loader"])
        partial = state.get("partial")
        if partial is not None:  # stopped inside an epoch: the RNGs are set after the replay
            self._partial = {**partial, "rng": rng}
            return int(partial["epoch"])
        _set_rng(rng)
        return int(state["epoch"]) + 1

    def checkpoint_state(self, epoch: int, partial: dict | None = None) -> dict[str, Any]:
        """Everything needed to continue after ``epoch`` (or inside the next one, ``partial``);
        loadable with weights_only=True."""
        return {
            "epoch": epoch,
            "partial": partial,
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "updates": self.updates,
            "skipped_steps": self.skipped_steps,
            "frozen": self.freezer.frozen,
            "result": {
                "history": self.result.history,
                "best_val_top1": self.result.best_val_top1,
                "best_epoch": self.result.best_epoch,
                "wall_time_s": self.result.wall_time_s,
            },
            "rng": {
                **_get_rng(),
                "loader": self.train_loader.generator.get_state()
                if self.train_loader.generator is not None
                else None,
            },
        }

    def _stop(self, epoch: int, step: int, partial: dict[str, Any]) -> None:
        """A stop signal arrived: checkpoint the state after this step and exit."""
        self.result.wall_time_s = time.perf_counter() - self._t0
        if self.dist.is_main:
            self.run.save_checkpoint(self.checkpoint_state(epoch - 1, partial))
        self.reporter.close()
        raise Interrupted(
            self._signals.received,
            f"stopped by {self._signals.received} at epoch {epoch}, step {step}; checkpoint "
            f"written; continue with --resume {self.run.path}",
        )

    def _nonfinite(self, value: float, epoch: int, step: int) -> None:
        """Skip a step whose loss is NaN/Inf, at most ``train.skip_nonfinite`` times a run."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.skipped_steps >= self.cfg.skip_nonfinite:
            raise TlkdError(
                f"loss became {value} at epoch {epoch}, step {step}"
                + (
                    f" (after skipping {self.skipped_steps} such steps)"
                    if self.skipped_steps
                    else ""
                )
                + "; lower train.optimizer.lr, set train.clip_grad, or allow skips with "
                "train.skip_nonfinite"
            )
        self.skipped_steps += 1
        self.result.skipped_steps = self.skipped_steps
        self.reporter.print(
            f"epoch {epoch}, step {step}: loss {value}, step skipped "
            f"({self.skipped_steps}/{self.cfg.skip_nonfinite})"
        )


class Interrupted(TlkdError):
    """Stopped by SIGINT (exit 130) or SIGTERM (exit 143) after writing a checkpoint."""

    def __init__(self, signame: str, message: str) -> None:
        self.exit_code = 130 if signame == "SIGINT" else 143
        super().__init__(message)


class StopSignals:
    """First SIGINT/SIGTERM: ask the loop to stop after the current step. A second SIGINT
    (Ctrl-C) exits at once. Only the main thread can take signals; elsewhere this is a no-op."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(
            f"\n{self.received}: stopping after this step and writing a checkpoint "
            "(Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _get_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
