"""distill: a student (the `model:` section) learns from one or more frozen teachers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tlkd.config.schema import Config, DistillConfig
from tlkd.data.datasets import unlabeled
from tlkd.data.memory import MemoryLoader, usable_cache_dir
from tlkd.data.paired import PairedLoader
from tlkd.data.pipeline import extra_loader
from tlkd.distill.cache import (
    CachedTeacher,
    CachedViews,
    Slot,
    build_bank,
    cached_value,
    digest,
    teacher_digest,
)
from tlkd.distill.indexed import BatchIndices, IndexedLoader
from tlkd.distill.mixing import BatchMix
from tlkd.distill.objective import Distillation, class_index
from tlkd.distill.registry import LOSSES
from tlkd.distill.teacher import Teacher, build_teacher
from tlkd.engine.device import autocast
from tlkd.engine.distributed import gather_cat
from tlkd.engine.inference import classification_metrics
from tlkd.engine.progress import Reporter
from tlkd.engine.speed import measure_speed
from tlkd.errors import ConfigError, first_line
from tlkd.models.factory import count_params
from tlkd.recipes.build import build_experiment, subset_seed
from tlkd.recipes.runner import train


def distill(
    cfg: Config,
    *,
    dry_run: bool = False,
    reporter: Reporter | None = None,
    resume: Path | None = None,
) -> dict[str, Any] | None:
    """Distil as ``cfg`` says; returns the run's summary (None for a dry run)."""
    if not cfg.teacher_list:
        raise ConfigError("teacher", "distill needs a teacher (teacher: or teachers:)")
    if cfg.data.dataset == "folder" and cfg.data.train is None:
        raise ConfigError("data.train", "is required to train (an image folder)")
    implied: dict[str, Any] = {}
    if cfg.distill is None:  # a teacher alone: the default losses
        implied["distill"] = DistillConfig().model_dump(mode="json")
    else:
        implied.update(_tasks_define_classes(cfg))
    reporter = reporter or Reporter(cfg.train.log_every)
    exp = build_experiment(cfg, log=reporter.print, resume=resume, dry_run=dry_run, implied=implied)
    cfg = exp.cfg
    with exp.startup.phase("teachers"):
        teachers = [
            build_teacher(t, _teacher_key(cfg, i), exp.loaders.mean, exp.loaders.std).to(exp.device)
            for i, t in enumerate(cfg.teacher_list)
        ]
    objective = Distillation(
        exp.model,
        teachers,
        cfg.distill.losses,
        exp.classes,
        cfg.distill.tasks,
        [t.weight for t in cfg.teacher_list],
        cfg.data.image_size,
        exp.device,
        mix=BatchMix(**fm.model_dump()) if (fm := cfg.distill.function_matching) else None,
    )
    exp.record(  # the layers feature losses chose (their defaults), as config values
        {
            f"distill.losses.{i}.{side}": layers
            for i, (s_layers, t_layers, _) in objective.pairs.items()
            for side, layers in (("student_layers", s_layers), ("teacher_layers", t_layers))
            if getattr(cfg.distill.losses[i], side) is None
        }
    )
    plan, info = [], []
    with exp.startup.phase("teacher_runtime"):  # timing the runtimes (auto), exporting
        plan += _resolve_runtimes(cfg, exp, teachers, resume, dry_run, objective)
    for i, teacher in enumerate(teachers):
        # a teacher of the student's classes, or of a superset (its logits for the student's)
        usable, idx = class_index(teacher, exp.classes)
        top1 = None
        if usable and isinstance(exp.loaders.val, MemoryLoader):
            # the same teacher on the same val images: measured once, remembered in the cache
            # dir, so the runs of a sweep do not each pay a pass over the val set
            val = exp.loaders.val
            mapped = [] if idx is None else [idx]  # a superset teacher: its logits for ours
            key = digest(
                teacher_digest(teacher), val.images, val.targets, exp.dtype, "val_top1", *mapped
            )
            with exp.startup.phase("teacher_val"):
                top1, _ = cached_value(
                    usable_cache_dir(cfg.data.cache_dir),
                    key,
                    lambda teacher=teacher, idx=idx: _teacher_top1(teacher, exp, cfg, idx),
                )
        elif usable:
            with exp.startup.phase("teacher_val"):  # a pass of the teacher over the val set
                top1 = _teacher_top1(teacher, exp, cfg, idx)
        shown = f"val top-1 {top1:.2f}%" if top1 is not None else "val top-1 n/a (other classes)"
        plan.append(f"teacher {i}   {teacher.name}: {teacher.params():,} parameters, {shown}")
        if idx is not None:
            plan.append(
                f"teacher {i}   predicts {len(teacher.classes)} classes, a superset of the "
                f"student's {len(exp.classes)}: logit losses use its logits for the student's "
                "classes, in the student's order"
            )
        info.append({"name": teacher.name, "params": teacher.params(), "val_top1": top1})
    if objective.metric_teacher is not None:  # train_teacher_top1 against this, per epoch
        objective.teacher_val_top1 = info[objective.metric_teacher]["val_top1"]
        objective.log = reporter.print
    losses = ", ".join(
        f"{name} x{loss.weight:g}"
        for name, loss in zip(objective.names, cfg.distill.losses, strict=True)
    )
    if cfg.distill.cache is not None:  # refused before a dry run ends (and a sweep starts)
        _check_cache(cfg, exp)
    _index_batches(cfg, exp, objective)  # before the terms' plan lines: they may use the data
    plan.append(f"losses      {losses}")
    # each term's reference and resolved settings, or its own account (``plan_line``)
    for i, (name, term) in enumerate(zip(objective.names, objective.terms, strict=True)):
        line = term.plan_line() if hasattr(term, "plan_line") else _term_line(cfg, i, objective)
        plan.append(f"{name:<11} {line}")
    if (fm := cfg.distill.function_matching) is not None:
        plan.append(
            f"mixing      function matching (Beyer et al. 2022): teacher and student see the same "
            f"mixed images (mixup alpha {fm.mixup_alpha:g}, cutmix alpha {fm.cutmix_alpha:g}); "
            "train_top1 is measured against the unmixed labels"
        )
    if cfg.data.unlabeled is not None:
        plan.append(_add_unlabeled(cfg, exp, reporter))
    if cfg.train.compile is True and objective.student_tap is not None:
        plan.append(
            "compile     the student runs eager: its feature losses read its layers through "
            "hooks on the plain model (train.compile speeds up logit losses only)"
        )
    summary_extra: dict[str, Any] = {"teachers": info}
    if cfg.distill.cache is not None and not dry_run:
        summary_extra["teacher_cache"] = _use_cache(cfg, exp, teachers, objective, reporter)
    if not dry_run:
        summary_extra.update(_speeds(exp, teachers, cfg))
    return train(exp, objective, "distill", reporter, dry_run, plan, summary_extra, resume)


def _add_unlabeled(cfg: Config, exp, reporter) -> str:
    """``data.unlabeled``: every labelled batch is joined by a batch of these images (label
    -1), on which the student learns from the teachers alone (e.g. the target domain of an
    adapted teacher). ``ce`` stays on the labelled images."""
    if cfg.distill.cache is not None:
        raise ConfigError("distill.cache", "does not cover data.unlabeled images; drop one")
    for i, loss in enumerate(cfg.distill.losses):
        if LOSSES[loss.type].needs_labels:
            raise ConfigError(
                f"distill.losses.{i}", f"{loss.type} reads the labels: not with data.unlabeled"
            )
    images = unlabeled(cfg.data.unlabeled, cfg.data.unlabeled_limit, subset_seed(cfg))
    extra = extra_loader(
        cfg, images, exp.model_cfg, exp.device, train=True, in_memory=exp.loaders.in_memory,
        generator=exp.loaders.train.generator, log=reporter.print,
    )  # fmt: skip
    exp.loaders.train = PairedLoader(exp.loaders.train, extra)
    return (
        f"unlabeled   {len(images):,} images ({cfg.data.unlabeled}) join every batch: "
        "teacher losses only"
    )


def _index_batches(cfg: Config, exp, objective) -> None:
    """Terms with per-sample state (``attach_data``: crd's memory banks) get the training
    set's labels and a slot that a thin wrapper around the train loader fills with each
    batch's dataset indices (tlkd/distill/indexed.py; both data paths, global under torchrun)."""
    terms = [(i, t) for i, t in enumerate(objective.terms) if hasattr(t, "attach_data")]
    if not terms:
        return
    if cfg.data.unlabeled is not None:
        i = terms[0][0]
        raise ConfigError(
            f"distill.losses.{i}",
            f"{cfg.distill.losses[i].type} indexes the labelled training set: not with "
            "data.unlabeled",
        )
    labels = torch.tensor(exp.splits.train.targets, dtype=torch.long)
    slot = BatchIndices()
    exp.loaders.train = IndexedLoader(exp.loaders.train, slot, labels)
    for i, term in terms:
        term.attach_data(labels, slot, f"distill.losses.{i}")


def _check_cache(cfg: Config, exp) -> None:
    """What distill.cache cannot serve, refused in a dry run too (so a sweep's checks catch
    it): feature losses (crd, rkd, reviewkd, ...: the bank holds logits only), a teacher with
    batch statistics, and the file data path. Runs before any loader wrapper."""
    for i, loss in enumerate(cfg.distill.losses):
        if LOSSES[loss.type].inputs == "features":
            raise ConfigError(
                f"distill.losses.{i}",
                f"{loss.type} needs the teacher's feature maps, which distill.cache does not "
                "store; remove distill.cache or use logit losses",
            )
    for i, t in enumerate(cfg.teacher_list):
        if t.train_bn:
            raise ConfigError(
                f"{_teacher_key(cfg, i)}.train_bn",
                "batch statistics make a teacher's outputs depend on the batch: not cacheable",
            )
    if not isinstance(exp.loaders.train, MemoryLoader):
        raise ConfigError(
            "distill.cache", f"needs the in-memory data path; this run uses {exp.loaders.note}"
        )


def _use_cache(cfg: Config, exp, teachers: list[Teacher], objective, reporter) -> dict[str, Any]:
    """Swap the live teachers for the bank of stored views and logits (tlkd.distill.cache);
    :func:`_check_cache` has passed."""
    c = cfg.distill.cache
    cache_dir = usable_cache_dir(cfg.data.cache_dir)
    with exp.startup.phase("teacher_cache"):  # the teacher's views and logits, stored
        bank = build_bank(
            exp.loaders.train, teachers, objective.uses_teacher, c.views, c.seed, exp.dtype,
            exp.device, cache_dir, reporter.print,
        )  # fmt: skip
    slot = Slot()
    objective.teachers = [CachedTeacher(t, slot, i) for i, t in enumerate(teachers)]
    exp.loaders.train = CachedViews(exp.loaders.train, bank, slot)
    return {
        "views": c.views,
        "files": [str(f) for f in bank.files],
        "build_s": round(bank.built_s, 3),
    }


def _resolve_runtimes(
    cfg: Config, exp, teachers: list[Teacher], resume: Path | None, dry_run: bool, objective
) -> list[str]:
    """Each teacher's ``runtime`` (tlkd/distill/runtime.py): as set, or for ``auto`` the first
    start's choice where it still works here (a resume, a rerun of a saved config), else timed
    now (not in a dry run; on the main process, the others take its choice). Recorded as a
    resolved value; returns the plan lines."""
    from tlkd.distill import runtime as rt
    from tlkd.engine import distributed
    from tlkd.engine.tune import has_conv
    from tlkd.recipes.build import first_choices

    first = {**first_choices(resume), **cfg.resolved}
    shape = (
        min(cfg.train.batch_size // distributed.info().world, 128),
        int(exp.model_cfg["input_size"][0]), cfg.data.image_size, cfg.data.image_size,
    )  # fmt: skip
    lines, chosen = [], {}
    for i, (teacher, t_cfg) in enumerate(zip(teachers, cfg.teacher_list, strict=True)):
        key = f"{_teacher_key(cfg, i)}.runtime"
        logits_only = teacher.tap is None and not t_cfg.train_bn
        runtime, why = t_cfg.runtime, f"{t_cfg.runtime} ({key})"
        if runtime == "onnxruntime":
            problem = rt.unusable(exp.device, logits_only)
            if problem is not None:
                raise ConfigError(key, f"onnxruntime {problem}")
        # the first start's choice, unless it cannot run here (then timed again)
        if (
            runtime == "auto"
            and first.get(key) in rt.RUNTIMES
            and (first[key] != "onnxruntime" or rt.unusable(exp.device, logits_only) is None)
        ):
            runtime, why = first[key], f"{first[key]} (as the run's first start chose)"
        if runtime == "auto":
            options = rt.candidates(exp.device, logits_only, has_conv(teacher.model))
            if not objective.uses_teacher[i]:  # read by no loss: nothing to gain
                options = options[:1]
            if dry_run and len(options) > 1:
                lines.append(f"teacher {i}   runtime auto (timed when the run starts)")
                continue
            runtime, why = distributed.broadcast(
                rt.choose(
                    teacher.model, options, shape, exp.dtype,
                    usable_cache_dir(cfg.data.cache_dir), str(exp.device),
                )
                if distributed.info().is_main or len(options) == 1
                else None
            )  # fmt: skip
        if dry_run and runtime == "onnxruntime":  # exported when the run starts
            lines.append(f"teacher {i}   runtime {why}")
            continue
        try:
            teacher.set_runtime(runtime, torch.zeros(shape))
        except Exception as err:  # noqa: BLE001 - the exporter's or onnxruntime's own errors
            raise ConfigError(
                key, f"could not run this teacher as {runtime}: {first_line(err)}"
            ) from None
        chosen[key] = runtime
        lines.append(f"teacher {i}   runtime {why}")
    if chosen:
        exp.record(chosen)
    return lines


def _term_line(cfg: Config, i: int, objective) -> str:
    """A term's plan line from the registry and its resolved config: what it is, its settings
    and, for feature losses, the layers paired (no per-type code)."""
    loss = cfg.distill.losses[i]
    entry = LOSSES[loss.type]
    shown_value = lambda v: str(v).lower() if isinstance(v, bool) else f"{v:g}"  # noqa: E731
    settings = [f"{key} {shown_value(getattr(loss, key))}" for key in entry.params]
    if i in objective.pairs:
        s_layers, t_layers, _ = objective.pairs[i]
        settings.append(f"layers {s_layers} -> teacher {t_layers}")
    if getattr(loss, "standardize", False):
        settings.append("logits z-scored (Sun et al. 2024): temperature is the base temperature")
    shown = "; ".join(settings)
    return f"{entry.about}" + (f": {shown}" if shown else "")


def _teacher_key(cfg: Config, i: int) -> str:
    return f"teachers.{i}" if cfg.teachers is not None else "teacher"


def _tasks_define_classes(cfg: Config) -> dict[str, Any]:
    """With tasks, the student's classes are the tasks' classes, task after task."""
    tasks = cfg.distill.tasks
    if not tasks:
        return {}
    union = [c for t in tasks for c in t.classes]
    if len(set(union)) != len(union):
        raise ConfigError("distill.tasks", "tasks must not share classes")
    if cfg.data.classes is not None and set(cfg.data.classes) != set(union):
        raise ConfigError("data.classes", "must be the tasks' classes together (or left out)")
    return {"data.classes": union}


@torch.inference_mode()
def _teacher_top1(teacher: Teacher, exp, cfg: Config, idx: list[int] | None = None) -> float:
    """The teacher's val top-1 among the student's classes (``idx``: its logits for them)."""
    logits, targets = [], []
    for images, y in exp.loaders.val:
        with autocast(exp.device, exp.dtype):
            out, _ = teacher(images.to(exp.device))
        out = out.float().cpu()
        logits.append(out if idx is None else out[:, idx])
        targets.append(y)
    # under torchrun each process holds a shard of val: measure on the whole set
    return classification_metrics(*gather_cat(torch.cat(logits), torch.cat(targets)))["top1"]


def _speeds(exp, teachers: list[Teacher], cfg: Config) -> dict[str, Any]:
    """Parameters and CPU/GPU latency of student and teachers, so every run shows the gain:
    each model's own PyTorch latency at batch 1, not the runtime the teacher trained with
    (``teacher.runtime``, recorded in the config)."""
    size = cfg.data.image_size
    student = measure_speed(
        exp.model, size, cfg.train.batch_size, exp.device, exp.dtype, throughput_runs=3
    )
    out: dict[str, Any] = {
        "student_params": count_params(exp.model)[0],
        "student_latency_ms": student["latency_ms"],
    }
    for i, teacher in enumerate(teachers):
        speed = measure_speed(
            teacher.model, size, cfg.train.batch_size, exp.device, exp.dtype, throughput_runs=3
        )
        out[f"teacher{i}_latency_ms"] = speed["latency_ms"]
    return out
