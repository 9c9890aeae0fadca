"""What a run tells: the plan lines printed before training and summary.json."""

from __future__ import annotations

import json
from typing import Any

from timm.data import resolve_model_data_config

from tlkd.config import safe_yaml
from tlkd.config.schema import Config
from tlkd.engine.trainer import FitResult
from tlkd.models.factory import count_params
from tlkd.recipes.build import Experiment
from tlkd.run.card import COMMAND, README, model_card
from tlkd.run.rundir import CONFIG, SUMMARY, RunDir, write_json, write_text
from tlkd.versions import versions


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; 0 where not measurable)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return 0.0


def plan_lines(exp: Experiment, steps_per_epoch: int, mode: str) -> list[str]:
    """A short human summary of what the run will do."""
    cfg, splits = exp.cfg, exp.splits
    total, trainable = count_params(exp.model)
    head = (
        f"MLP {cfg.model.head.hidden} + dropout {cfg.model.head.dropout}"
        if cfg.model.head is not None
        else "linear"
    )
    freeze = cfg.model.freeze if isinstance(cfg.model.freeze, str) else ", ".join(cfg.model.freeze)
    unfreeze = (
        f", unfreeze after epoch {cfg.model.unfreeze_after}" if cfg.model.unfreeze_after else ""
    )
    if cfg.model.lora is not None:  # the lora plan line says what trains
        freeze = "backbone but the LoRA adapters"
    if cfg.train.lp_epochs:  # LP-FT freezes the backbone itself
        freeze, unfreeze = "backbone", f", unfreeze after epoch {cfg.train.lp_epochs} (LP-FT)"
    t = cfg.train
    return (
        [
            f"mode        {mode}",
            f"model       {cfg.model.name}  weights: {exp.weights.source}  head: {head} "
            f"({exp.weights.head}), {len(exp.classes)} classes",
            f"parameters  {total:,} total, {trainable:,} trainable, {total - trainable:,} frozen "
            f"(freeze: {freeze}{unfreeze})",
            f"data        {cfg.data.dataset}: {len(splits.train):,} train images, "
            f"{len(splits.val):,} val images ({splits.val_source}), {cfg.data.image_size}px, "
            f"{exp.loaders.note}",
            f"schedule    {t.epochs} epochs x {steps_per_epoch} steps (batch {t.batch_size}"
            f"{f', accumulate {t.accum_steps}' if t.accum_steps > 1 else ''}) = "
            f"{t.epochs * steps_per_epoch:,} steps; {t.optimizer.name} lr {t.optimizer.lr or 0:g}, "
            f"scheduler {t.scheduler.name}",
            f"device      {exp.device}, precision {_shown_precision(cfg, exp)}, "
            f"channels_last {str(t.channels_last).lower()}, compile {str(t.compile).lower()}",
        ]
        + [f"{'default':<11} {key}: {why}" for key, why in exp.choices.items()]
        + [exp.startup.line()]
        + ([f"warning     {exp.weights.warning}"] if exp.weights.warning else [])
        + (
            [f"skipped     {len(splits.bad_images)} unreadable images, e.g. {splits.bad_images[0]}"]
            if splits.bad_images
            else []
        )
    )


def _shown_precision(cfg: Config, exp: Experiment) -> str:
    if cfg.train.precision == "auto" and exp.device.type == "cpu":
        return "auto (measured when the run starts)"
    return str(exp.dtype or "fp32").removeprefix("torch.")


def write_summary(
    run: RunDir,
    exp: Experiment,
    mode: str,
    result: FitResult | None,
    status: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    total, trainable = count_params(exp.model)
    history = result.history if result else []
    data_cfg = resolve_model_data_config(exp.model)
    summary: dict[str, Any] = {
        "experiment": exp.cfg.experiment,
        "mode": mode,
        "status": status,
        "run_dir": str(run.path),
        "model": exp.cfg.model.name,
        "classes": exp.classes,
        "num_classes": len(exp.classes),
        "epochs_done": len(history),
        "best_val_top1": result.best_val_top1 if result and result.best_val_top1 >= 0 else None,
        "best_epoch": result.best_epoch if result and result.best_val_top1 >= 0 else None,
        "final_val_top1": history[-1]["val_top1"] if history else None,
        "final_val_top5": history[-1]["val_top5"] if history else None,
        "params": total,
        "trainable_params": trainable,
        "train_images": len(exp.splits.train),
        "val_images": len(exp.splits.val),
        "wall_time_s": round(result.wall_time_s, 3) if result else 0.0,
        "skipped_steps": result.skipped_steps if result else 0,
        "skipped_images": len(exp.splits.bad_images),
        "skipped_image_files": exp.splits.bad_images[:50],
        "data_path": exp.loaders.note,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        # seconds from the command's start to the first training step, by phase
        "startup_s": exp.startup.as_dict(),
        "device": str(exp.device),
        "precision": str(exp.dtype or "fp32").replace("torch.", ""),
        "compile": exp.cfg.train.compile,
        "weights_source": exp.weights.source,
        "weights": "pretrained" if exp.weights.loaded else "random",
        "weights_warning": exp.weights.warning,
        "defaults_chosen": exp.choices,
        "resolved": exp.resolved,  # the values tlkd chose (config.yaml: resolved)
        "input_mean": [round(float(v), 4) for v in data_cfg["mean"]],
        "input_std": [round(float(v), 4) for v in data_cfg["std"]],
        # the command that started the run (a resume keeps the first one)
        "command": _previous(run).get("command") or COMMAND.get(),
        "versions": versions(),
    }
    summary.update(extra or {})
    write_json(run.file(SUMMARY), summary)
    if status == "finished":
        write_card(run, summary)
    return summary


def write_card(run: RunDir, summary: dict[str, Any]) -> None:
    """README.md, the run's model card (see tlkd/run/card.py)."""
    config = safe_yaml.safe_load(run.file(CONFIG).read_text()) or {}
    write_text(run.file(README), model_card(summary, config))


def _previous(run: RunDir) -> dict[str, Any]:
    try:
        data = json.loads(run.file(SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
