"""evaluate: accuracy, per-class accuracy, confusion, calibration, size and speed of a model."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from tlkd.config.loader import load_config, with_values
from tlkd.engine.inference import classification_metrics, predict
from tlkd.engine.progress import Reporter
from tlkd.engine.speed import measure_speed
from tlkd.errors import ConfigError
from tlkd.models.factory import count_params
from tlkd.recipes.build import build_experiment
from tlkd.recipes.runner import saved_config
from tlkd.run.plots import plot_confusion
from tlkd.run.rundir import CONFIG, EVAL, WEIGHTS, RunDir, write_json
from tlkd.versions import versions

CONFUSION = "confusion.png"


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE in percent: |accuracy - confidence| per equal-width confidence bin, weighted by the
    bin's share of samples (Guo et al. 2017)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
            ece += gap * in_bin.float().mean()
    return 100.0 * ece.item()


def confusion_matrix(predicted: torch.Tensor, targets: torch.Tensor, n: int) -> torch.Tensor:
    """Counts, rows = true class, columns = predicted class."""
    return torch.bincount(targets * n + predicted, minlength=n * n).reshape(n, n)


def overrides_slug(overrides: list[str], cfg: Any) -> str:
    """The file-name part naming an evaluation with overrides: ``<key>-<value>`` per override
    (the key's last part; a path's last folder), joined by ``_`` and cut at 48 characters, then
    ``-`` and 6 hex digits of a hash of the keys and their resolved values (absolute paths), so
    the same overrides always name the same file and different ones never collide.
    ``data.val=other/folder`` -> ``val-folder-1a2b3c``."""
    readable, resolved = [], []
    for text in overrides:
        key, _, raw = text.partition("=")
        key = key.strip()
        value = _lookup(cfg, key, raw)
        resolved.append([key, str(value) if isinstance(value, Path) else value])
        shown = value.name if isinstance(value, Path) else value
        shown = shown if isinstance(shown, str) else json.dumps(shown, default=str)
        readable.append(re.sub(r"[^A-Za-z0-9_.+-]+", "", f"{key.split('.')[-1]}-{shown}"))
    digest = hashlib.sha1(json.dumps(resolved, default=str).encode()).hexdigest()[:6]
    return f"{'_'.join(readable)[:48].strip('_.-') or 'overrides'}-{digest}"


def _lookup(cfg: Any, key: str, raw: str) -> Any:
    """The value ``key`` holds in the loaded config (typed, paths absolute), else its text."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif hasattr(node, part) and not isinstance(node, (list, dict)):
            node = getattr(node, part)
        else:
            return raw.strip()
    if isinstance(node, BaseModel):
        return node.model_dump(mode="json")
    return node


def evaluate(
    target: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    reporter: Reporter | None = None,
    speed: bool = True,
) -> dict[str, Any]:
    """Evaluate a run directory's best weights, or the model a config file names, on the val
    data (or ``data.val=...``); writes eval.json and confusion.png (with overrides, into a run
    directory: eval-<slug>.json and confusion-<slug>.png, see :func:`overrides_slug`) and
    returns the results."""
    path = Path(target).expanduser().resolve()
    overrides = list(overrides)
    given = list(overrides)  # the user's, recorded in the results and naming the files
    if path.is_dir():
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise ConfigError(
                None, f"{path} is not a tlkd run directory (needs {CONFIG} and {WEIGHTS})"
            )
        if any(o.startswith("data.val=") for o in overrides):
            overrides = ["data.dataset=folder", "data.train=null", *overrides]
        # the run's own best weights
        cfg = with_values(load_config(path / CONFIG, overrides), {"model.pretrained": str(path)})
        run = RunDir(path)
    elif path.is_file():
        cfg = load_config(path, overrides)
        run = None
    else:
        raise ConfigError(None, f"no such run directory or config file: {path}")
    reporter = reporter or Reporter(cfg.train.log_every)
    exp = build_experiment(cfg, for_training=False, log=reporter.print)
    cfg = exp.cfg  # with the values chosen (image size, precision, memory layout)
    if run is not None and exp.weights.head != "loaded":
        raise ConfigError(
            "data", "the evaluation data's classes differ from those the run was trained on"
        )
    t0 = time.perf_counter()
    logits, targets = predict(
        exp.model, exp.loaders.val, exp.device, exp.dtype, cfg.train.channels_last
    )
    predict_s = time.perf_counter() - t0
    n = len(exp.classes)
    probs = logits.softmax(dim=1)
    predicted = logits.argmax(dim=1)
    matrix = confusion_matrix(predicted, targets, n)
    per_class_total = matrix.sum(dim=1)
    per_class = {
        c: (100.0 * matrix[i, i].item() / per_class_total[i].item()) if per_class_total[i] else None
        for i, c in enumerate(exp.classes)
    }
    total, trainable = count_params(exp.model)
    scores = classification_metrics(logits, targets)
    results: dict[str, Any] = {
        "target": str(path),
        "model": cfg.model.name,
        "weights": exp.weights.source,
        "images": len(targets),
        "predict_img_per_s": len(targets) / predict_s,  # the pass over the data, loading included
        "data_path": exp.loaders.note,
        "precision": cfg.train.precision,
        "channels_last": cfg.train.channels_last,
        "top1": scores["top1"],
        "top5": scores["top5"],
        "loss": scores["loss"],
        "ece": expected_calibration_error(probs, targets),
        "per_class_top1": per_class,
        "confusion": matrix.tolist(),
        "classes": exp.classes,
        "params": total,
        "trainable_params": trainable,
        "image_size": cfg.data.image_size,
        "batch_size": cfg.train.batch_size,
        "device": str(exp.device),
        "versions": versions(),
    }
    if speed:
        results.update(
            measure_speed(
                exp.model,
                cfg.data.image_size,
                cfg.train.batch_size,
                exp.device,
                exp.dtype,
                cfg.train.channels_last,
            )
        )
    results["overrides"] = given
    note = _protocol_note(cfg, run is not None)
    if note is not None:
        results["note"] = note
    eval_name, confusion_name = EVAL, CONFUSION
    if run is None:
        run = RunDir.create(cfg.output_dir, f"{cfg.experiment}-eval")
        run.save_config(saved_config(exp))
    elif given:  # the run's own eval.json stays the plain evaluation's
        slug = overrides_slug(given, cfg)
        eval_name, confusion_name = f"eval-{slug}.json", f"confusion-{slug}.png"
    results["eval_file"] = eval_name
    write_json(run.file(eval_name), results)
    plot_confusion(results["confusion"], exp.classes, run.file(confusion_name))
    results["run_dir"] = str(run.path)
    _print_table(results, reporter)
    return results


def _protocol_note(cfg: Any, is_run: bool) -> str | None:
    """What a run's own val_top1 measured that this evaluation does not (a tent run's batch
    statistics), or None."""
    if not is_run or cfg.adapt is None or cfg.adapt.method != "tent":
        return None
    return (
        "a tent run: its val_top1 normalised each val batch with that batch's own BatchNorm "
        "statistics (summary.json: val_protocol); this evaluation uses the running statistics "
        "saved in model.safetensors, so its top-1 can differ"
    )


def _print_table(r: dict[str, Any], reporter: Reporter) -> None:
    from rich.table import Table

    table = Table(title=f"{r['model']} on {r['images']:,} images", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("top-1", f"{r['top1']:.2f}%"),
        ("top-5", f"{r['top5']:.2f}%"),
        ("loss", f"{r['loss']:.4f}"),
        ("ECE", f"{r['ece']:.2f}%"),
        ("parameters", f"{r['params']:,}"),
    ]
    if "latency_ms" in r:
        rows += [
            ("latency (batch 1)", f"{r['latency_ms']:.2f} ms/image"),
            (f"throughput (batch {r['batch_size']})", f"{r['throughput_img_per_s']:.0f} images/s"),
        ]
    for name, value in rows:
        table.add_row(name, value)
    for name, acc in r["per_class_top1"].items():
        table.add_row(f"  class {name}", "-" if acc is None else f"{acc:.1f}%")
    if reporter.quiet:
        return
    reporter.console.print(table)
    if r.get("note"):
        reporter.print(f"note: {r['note']}")
    reporter.print(f"wrote {Path(r['run_dir']) / r['eval_file']}")
