"""wise: WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"), the
weight-space ensemble of a fine-tuning run's starting weights theta0 and its final weights
theta1: theta(alpha) = (1 - alpha) * theta0 + alpha * theta1 for every tensor, as the official
code (mlfoundations/wise-ft, ``_merge``), each alpha scored on the run's val set, the best
written as a new run directory.

Two departures, both forced by the start not being a zero-shot model: a head that was new at
the start (randomly initialised, the usual case when the classes differ) is the fine-tuned
head at every alpha, since the random head predicts nothing (the paper's theta0 head is
CLIP's zero-shot classifier; a head loaded with the weights, same classes, is interpolated
like the rest); and integer tensors (BatchNorm's ``num_batches_tracked``) are theta1's.
BatchNorm running statistics are interpolated like the weights, as the official code does
with every state-dict entry.

A LoRA run (``model.lora``): theta0 is the base weights (its start.safetensors), theta1 the
final weights with the adapters merged in, so theta(alpha) is the base plus alpha times the
low-rank update (and the head as above).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tlkd.config import safe_yaml
from tlkd.config.loader import load_config, with_values
from tlkd.engine.inference import classification_metrics, predict
from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError
from tlkd.models.factory import build_model, count_params, read_state_dict
from tlkd.models.head import classifier_names, is_head_key
from tlkd.models.lora import merged_checkpoint
from tlkd.recipes.build import build_experiment
from tlkd.run.card import COMMAND, README, command_line, model_card
from tlkd.run.rundir import CHECKPOINT, CONFIG, START, SUMMARY, RunDir, write_json, write_text
from tlkd.versions import versions


def interpolate(
    theta0: dict[str, torch.Tensor],
    theta1: dict[str, torch.Tensor],
    alpha: float,
    keep: set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * theta0 + alpha * theta1 per floating-point tensor; theta1's for the
    names in ``keep`` (a new head) and for integer tensors (counters)."""
    if theta0.keys() != theta1.keys():
        missing = sorted(theta0.keys() ^ theta1.keys())
        raise ConfigError(None, f"the start and final weights differ in tensors, e.g. {missing[0]}")
    out = {}
    for key, t1 in theta1.items():
        t0 = theta0[key]
        if t0.shape != t1.shape:
            raise ConfigError(
                None, f"{key}: shape {tuple(t0.shape)} at the start, {tuple(t1.shape)} at the end"
            )
        if key in keep or not t1.is_floating_point():
            out[key] = t1.clone()
        else:
            out[key] = (1 - alpha) * t0 + alpha * t1
    return out


def head_keys(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """The state-dict names under the model's classifiers (its new head; both heads of a
    distilled DeiT)."""
    heads = classifier_names(model)
    return {k for k in state if is_head_key(k, heads)}


def check_alphas(alphas: list[float]) -> list[float]:
    """Each in [0, 1], duplicates dropped, in increasing order; default the paper's 0.5."""
    alphas = alphas or [0.5]
    for a in alphas:
        if not 0.0 <= a <= 1.0:
            raise ConfigError("--alpha", f"{a:g} is outside [0, 1] (0: the start, 1: the final)")
    return sorted(set(alphas))


def wise(
    run_dir: str | Path, alphas: list[float], reporter: Reporter | None = None
) -> dict[str, Any]:
    """Score theta(alpha) of the finished run ``run_dir`` on its val set for every alpha and
    write the best into a new run directory beside it (``<run>-wise``); returns its summary."""
    path = Path(run_dir).expanduser().resolve()
    alphas = check_alphas(list(alphas))
    if not (path / CONFIG).is_file() or not (path / SUMMARY).is_file():
        raise ConfigError(
            None, f"{path} is not a tlkd run directory (needs {CONFIG} and {SUMMARY})"
        )
    source = json.loads((path / SUMMARY).read_text())
    if source.get("mode") != "finetune":
        raise ConfigError(
            None, f"{path.name} is a {source.get('mode')} run; wise takes finetune runs"
        )
    run = RunDir(path)
    run_cfg = load_config(path / CONFIG)
    unfinished = ConfigError(
        None, f"{path.name} has not finished its {run_cfg.train.epochs} epochs "
        f"(continue it with tlkd finetune --resume {path})",
    )  # fmt: skip
    if source.get("status") != "finished":
        raise unfinished
    if not (path / CHECKPOINT).is_file():  # model.safetensors holds the best epoch's weights
        raise ConfigError(
            None, f"{path.name} kept no checkpoint.pt, which holds the final weights WiSE-FT "
            "interpolates (a sweep or train.keep_checkpoint: false drops it); rerun it",
        )  # fmt: skip
    state, _ = run.load_checkpoint()
    if state.get("partial") or int(state["epoch"]) != run_cfg.train.epochs:
        raise unfinished
    theta1 = {k: v.cpu() for k, v in state["model"].items()}
    reporter = reporter or Reporter(run_cfg.train.log_every)
    # the run's model, data and val split (as tlkd evaluate builds them)
    cfg = with_values(run_cfg, {"model.pretrained": str(path)})
    exp = build_experiment(cfg, for_training=False, log=reporter.print)
    if run_cfg.model.lora is not None:  # the checkpoint keeps the adapters apart
        theta1 = merged_checkpoint(exp.model, run_cfg.model.lora, theta1)
    theta0, start_note, head_new = _start(path, run_cfg, exp.classes, theta1)
    keep = head_keys(exp.model, theta1) if head_new else set()
    rows = []
    t0 = time.perf_counter()
    for alpha in alphas:
        exp.model.load_state_dict(interpolate(theta0, theta1, alpha, keep))
        logits, targets = predict(
            exp.model, exp.loaders.val, exp.device, exp.dtype, exp.cfg.train.channels_last
        )
        scores = classification_metrics(logits, targets)
        rows.append({"alpha": alpha, "val_top1": scores["top1"], "val_top5": scores["top5"],
                     "val_loss": scores["loss"]})  # fmt: skip
    best = max(rows, key=lambda r: (r["val_top1"], -r["val_loss"]))
    weights = interpolate(theta0, theta1, best["alpha"], keep)
    out = RunDir.create(path.parent, f"{path.name}-wise")
    saved = safe_yaml.safe_load((path / CONFIG).read_text())
    saved["experiment"] = out.path.name
    out.save_config(saved)
    out.save_weights(
        {k: v.contiguous() for k, v in weights.items()},
        {
            "format": "pt",
            "tlkd_model": run_cfg.model.name,
            "tlkd_num_classes": str(len(exp.classes)),
            "tlkd_wise_alpha": f"{best['alpha']:g}",
        },
    )
    total, _ = count_params(exp.model)
    summary = {
        "experiment": out.path.name,
        "mode": "wise",
        "status": "finished",
        "run_dir": str(out.path),
        "model": run_cfg.model.name,
        "classes": exp.classes,
        "num_classes": len(exp.classes),
        "best_val_top1": best["val_top1"],
        "best_epoch": None,
        "final_val_top1": best["val_top1"],
        "final_val_top5": best["val_top5"],
        "params": total,
        "trainable_params": total,
        "val_images": len(exp.splits.val),
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "wise": {
            "alpha": best["alpha"],
            "source_run": str(path),
            "theta0": start_note,
            "theta1": f"checkpoint.pt (epoch {int(state['epoch'])}, the final weights"
            + (", LoRA merged)" if run_cfg.model.lora is not None else ")"),
            "head": "fine-tuned (new at the start)" if head_new else "interpolated",
            "alphas": rows,
        },
        "versions": versions(),
    }
    summary["command"] = COMMAND.get()
    summary["reproduce"] = command_line("wise", str(path), "--alpha", f"{best['alpha']:g}")
    write_json(out.file(SUMMARY), summary)
    write_text(out.file(README), model_card(summary, saved))
    _print_table(rows, best, summary, path, reporter)
    return summary


def _start(
    path: Path, run_cfg: Any, classes: list[str], theta1: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str, bool]:
    """theta0: the run's start.safetensors, or (a run from before tlkd kept it) the weights
    re-created from its ``model.pretrained``; with a note and whether the head was new."""
    file = path / START
    if file.is_file():
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            head = (f.metadata() or {}).get("tlkd_head", "new")
        return read_state_dict(file, START), START, head == "new"
    model, report = build_model(run_cfg.model, len(classes), classes)
    if report.loaded == 0:
        raise ConfigError(
            None,
            f"{path.name} started from random weights ({report.source}): WiSE-FT interpolates "
            "from pretrained ones",
        )
    return (
        {k: v.detach().cpu() for k, v in model.state_dict().items()},
        f"re-created from model.pretrained ({report.source}); the run has no {START}",
        report.head == "new",
    )


def _print_table(
    rows: list[dict[str, Any]],
    best: dict[str, Any],
    summary: dict[str, Any],
    source: Path,
    reporter: Reporter,
) -> None:
    if reporter.quiet:
        return
    from rich.table import Table

    table = Table(title=f"WiSE-FT of {source.name} on {summary['val_images']:,} val images")
    for name in ("alpha", "val top-1", "val top-5", "val loss"):
        table.add_column(name, justify="right")
    for r in rows:
        mark = " *" if r is best else ""
        table.add_row(
            f"{r['alpha']:g}{mark}", f"{r['val_top1']:.2f}%", f"{r['val_top5']:.2f}%",
            f"{r['val_loss']:.4f}",
        )  # fmt: skip
    reporter.console.print(table)
    reporter.print(f"theta0: {summary['wise']['theta0']}; head: {summary['wise']['head']}")
    reporter.print(
        f"best alpha {best['alpha']:g} (val top-1 {best['val_top1']:.2f}%): "
        f"wrote {summary['run_dir']}"
    )
