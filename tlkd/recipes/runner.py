"""The life of a run, shared by every mode: the optimizer and scheduler, then the dry run
(print the plan, write nothing) or the run directory (new, or ``--resume``'s checkpoint after
checking the config is the same experiment), the training loop and the summary."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
import yaml

from tlkd.config import safe_yaml
from tlkd.config.loader import flatten, resolved_dict, validate
from tlkd.config.schema import Config
from tlkd.engine import distributed
from tlkd.engine.objectives import Objective
from tlkd.engine.optim import build_optimizer, build_scheduler
from tlkd.engine.progress import Reporter
from tlkd.engine.trainer import FitResult, Interrupted, Trainer
from tlkd.errors import ConfigError, TlkdError
from tlkd.models.freeze import Freezer
from tlkd.recipes.build import Experiment
from tlkd.recipes.summary import plan_lines, write_summary
from tlkd.run import tracking
from tlkd.run.rundir import CONFIG, START, RunDir

# Callbacks of whoever runs this process's runs, called with each epoch's metrics row on the
# main process after the run's own files are written (tlkd tune reports val to Optuna there).
EPOCH_HOOKS: ContextVar[tuple[Callable[[Path, dict[str, Any]], None], ...]] = ContextVar(
    "tlkd_epoch_hooks", default=()
)


def train(
    exp: Experiment,
    objective: Objective,
    mode: str,
    reporter: Reporter,
    dry_run: bool = False,
    plan_extra: list[str] | None = None,
    summary_extra: dict[str, Any] | None = None,
    resume: Path | None = None,
    start_weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any] | None:
    """Build the optimizer, print the plan and run the shared loop, writing the run directory
    (or continuing ``resume``'s). A mode adds its own plan lines and summary entries, and may
    give the weights training starts from, kept in a new run as start.safetensors."""
    cfg = exp.cfg
    if cfg.train.sync_bn and distributed.info().enabled:
        if exp.device.type != "cuda":
            raise ConfigError("train.sync_bn", "SyncBatchNorm needs GPUs (nccl); drop it on CPU")
        exp.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(exp.model)
    objective.attach(exp.model)
    objective.to(exp.device)
    optimizer = build_optimizer(cfg, exp.model, objective)
    # LP-FT (train.lp_epochs): the backbone is frozen for the linear-probing epochs
    freezing = (
        cfg.model.model_copy(update={"freeze": "backbone", "unfreeze_after": cfg.train.lp_epochs})
        if cfg.train.lp_epochs
        else cfg.model
    )
    freezer = Freezer(exp.model, freezing)
    steps = len(exp.loaders.train)
    updates_per_epoch = -(-steps // cfg.train.accum_steps)
    scheduler = build_scheduler(cfg, optimizer, updates_per_epoch)
    tracking.check(cfg)  # the libraries tracking asks for, before anything runs
    if dry_run:
        reporter.print("resolved config:")
        reporter.print(yaml.safe_dump(saved_config(exp), sort_keys=False).rstrip())
        reporter.print("")
        for line in plan_lines(exp, steps, mode) + (plan_extra or []):
            reporter.print(line)
        reporter.print("dry run: nothing trained, no run directory written")
        return None
    ddp = distributed.info()
    if resume is not None:
        run = RunDir(resume)
        check_resumable(run, exp)
        state, note = run.load_checkpoint()
        partial = state.get("partial")
        done = int(partial["epoch"]) - 1 if partial else int(state["epoch"])
        if done >= cfg.train.epochs:  # before anything is written: the run stays as it is
            raise ConfigError(
                "train.epochs",
                f"is {cfg.train.epochs} but {run.path.name} has finished {done} epochs: give "
                f"more to continue it (train.epochs={done + 5} trains 5 more)",
            )
    else:  # rank 0 picks the folder; the other processes use the same one
        run = RunDir(
            distributed.broadcast(
                RunDir.create(cfg.output_dir, cfg.experiment).path if ddp.is_main else None
            )
        )
    write_summary_ = write_summary if ddp.is_main else (lambda *a, **k: None)
    if ddp.is_main:
        run.save_config(saved_config(exp))
        if start_weights is not None and resume is None:
            run.save_weights(start_weights, start_metadata(exp), START)
    reporter.print(f"run dir     {run.path}")
    for line in plan_lines(exp, steps, mode) + (plan_extra or []):
        reporter.print(line)
    write_summary_(run, exp, mode, None, "running", summary_extra)
    tracker = tracking.Tracker(cfg, run, mode) if ddp.is_main else None

    def epoch_end(result: FitResult) -> None:
        write_summary_(run, exp, mode, result, "running", summary_extra)
        if tracker is not None:
            try:  # a tracking server's hiccup costs its log, not the run
                tracker.epochs(result.history)
            except TlkdError as err:
                reporter.print(f"warning     {err}; training goes on")
        for hook in EPOCH_HOOKS.get():  # main process only: under torchrun, must not raise
            hook(run.path, result.history[-1])

    trainer = Trainer(
        model=exp.model,
        objective=objective,
        freezer=freezer,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=exp.loaders.train,
        val_loader=exp.loaders.val,
        device=exp.device,
        dtype=exp.dtype,
        cfg=cfg.train,
        unfreeze_after=freezing.unfreeze_after,
        run=run,
        reporter=reporter,
        weights_metadata={
            "format": "pt",
            "tlkd_model": cfg.model.name,
            "tlkd_num_classes": str(cfg.model.num_classes),
        },
        on_epoch_end=epoch_end,
    )
    start = 1
    if resume is not None:
        start = trainer.restore(state)
        reporter.print(f"resume      {note}: epoch {start} of {cfg.train.epochs}")
    failed: TlkdError | None = None
    if tracker is not None:
        try:
            for line in tracker.start(saved_config(exp), start):
                reporter.print(line)
            tracker.epochs(trainer.result.history)  # a resume: epochs its last start missed
        except TlkdError as err:
            failed = err
    if distributed.any_rank(failed is not None):  # every process stops, not rank 0 alone
        raise failed or TlkdError("tracking could not start on the main process")
    try:
        # train.epochs 0 (adapt.method: adabn): validate the adapted model, train nothing
        result = trainer.fit(start) if cfg.train.epochs > 0 else trainer.validate_only()
    except BaseException as err:
        if tracker is not None:  # the run's own error wins over a tracking one
            stopped = isinstance(err, Interrupted | KeyboardInterrupt)
            status = getattr(err, "tracking_status", "KILLED" if stopped else "FAILED")
            try:
                tracker.finish(None, status)
            except Exception as tracking_err:  # noqa: BLE001
                reporter.print(f"warning     {tracking_err}")
        raise
    if not ddp.is_main:
        return None
    keep = cfg.train.keep_checkpoint is not False  # default: kept (sweeps set false)
    summary = write_summary(
        run, exp, mode, result, "finished", {**(summary_extra or {}), "checkpoint_kept": keep}
    )
    run.finish_checkpoints(keep)  # after the summary says finished: never a running run without
    if tracker is not None:
        tracker.finish(summary)
    reporter.print(
        f"done: best val top-1 {summary['best_val_top1']:.2f}% (epoch {summary['best_epoch']}), "
        f"final {summary['final_val_top1']:.2f}%, {summary['wall_time_s']:.1f}s"
    )
    reporter.print(f"run dir: {run.path}")
    return summary


def start_metadata(exp: Experiment) -> dict[str, str]:
    """start.safetensors' metadata: the model, where its weights came from, whether the head
    was new (randomly initialised) or loaded with them."""
    return {
        "format": "pt",
        "tlkd_model": exp.cfg.model.name,
        "tlkd_num_classes": str(exp.cfg.model.num_classes),
        "tlkd_weights_source": exp.weights.source,
        "tlkd_head": exp.weights.head,
    }


def saved_config(exp: Experiment) -> dict[str, Any]:
    """config.yaml: the validated config as given, every default filled in, and beside it
    (``resolved``) the values tlkd chose for it; loading it again reruns the same run."""
    data = resolved_dict(exp.source if exp.source is not None else exp.cfg)
    data["resolved"] = dict(exp.resolved)
    return data


def check_resumable(run: RunDir, exp: Experiment) -> None:
    """Resuming must continue the same experiment: only the epoch count may change (the
    values tlkd chose are the first start's, see build_experiment)."""
    saved_file = run.file(CONFIG)
    if not saved_file.is_file():
        raise ConfigError("--resume", f"{run.path} is not a tlkd run directory (no {CONFIG})")
    raw = safe_yaml.safe_load(saved_file.read_text())
    saved = flatten(raw)
    try:  # a key the run's config lacks (added to tlkd since) counts as its default
        saved = {**flatten(resolved_dict(validate(raw))), **saved}
    except ConfigError:
        saved = {**flatten(resolved_dict(Config())), **saved}
    now = flatten(saved_config(exp))
    # what may change on resume: the epochs, where files go, tracking, checkpoint keeping,
    # torch.compile and a teacher's runtime (the same computation, run another way)
    ignored = {"train.epochs", "output_dir", "experiment", "data.cache_dir"}
    ignored |= {"train.keep_checkpoint", "train.compile"}

    def value(config: dict[str, Any], key: str) -> Any:
        """A key's value, or the value tlkd chose for it where it is unset (a run saved
        before a default became resolved at start holds the value itself)."""
        own = config.get(key)
        return config.get(f"resolved.{key}") if own is None else own

    differ = sorted(
        k
        for k in saved.keys() | now.keys()
        if k not in ignored
        and not k.startswith(("resolved.", "tracking."))
        and not (k.startswith(("teacher.", "teachers.")) and k.endswith(".runtime"))
        and value(saved, k) != value(now, k)
    )
    if differ:
        shown = ", ".join(differ[:6]) + (", ..." if len(differ) > 6 else "")
        raise ConfigError("--resume", f"the config differs from the run's in: {shown}")
