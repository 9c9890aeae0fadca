"""The distillation objective: a weighted sum of loss terms over student and teacher outputs.

It plugs into the same training loop as finetune. Each loss is a registered term
(tlkd/distill/registry.py); the objective only routes inputs by what a term takes (labels,
logits or feature maps). Terms are submodules of the objective, so their trainable parts
(FitNet's regressors) train with the student and checkpoints keep them, while the saved
student weights (the model alone) do not contain them. Teachers are deliberately not
submodules, so they are neither optimised nor written into checkpoints.

Several teachers, one rule: a logit loss without ``teacher:`` learns from the weighted mean of
the teachers' softened probabilities at its temperature (``hard``: the top class of the mean
at T=1), see :func:`tlkd.distill.losses.ensemble_logits`. A teacher whose classes are a
superset of the student's (matched by name) teaches through its logits for the student's
classes, in the student's order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tlkd.config.schema import LossConfig, TaskConfig
from tlkd.distill.features import FeatureTap, Layer, resolve_layers
from tlkd.distill.losses.ensemble import ensemble_logits
from tlkd.distill.losses.kd import standardize_logits
from tlkd.distill.registry import LOSSES
from tlkd.distill.teacher import Teacher
from tlkd.engine import distributed
from tlkd.engine.inference import topk_accuracy
from tlkd.engine.objectives import Objective, StepOutput
from tlkd.errors import ConfigError, TlkdError

# train_teacher_top1 this many points under the teacher's val top-1: warn about augmentation
VIEW_GAP_WARNING = 15.0


def class_index(teacher, want: list[str]) -> tuple[bool, list[int] | None]:
    """How ``teacher``'s outputs serve the classes ``want``: ``(usable, index)``, where index
    picks and orders the teacher's logits for ``want`` (None: use them as they are). A
    teacher with known classes may predict a superset of ``want`` (matched by name); one whose
    classes are unknown must predict as many classes."""
    if teacher.classes is None:
        return teacher.num_classes == len(want), None
    if teacher.classes == want:
        return True, None
    if set(want) <= set(teacher.classes):
        return True, [teacher.classes.index(c) for c in want]
    return False, None


class Distillation(Objective):
    """Student learns from ``teachers`` through ``losses`` (and, with ``tasks``, one slice of
    its classifier per task, each taught by that task's teacher)."""

    def __init__(
        self,
        model: nn.Module,
        teachers: list[Teacher],
        losses: list[LossConfig],
        classes: list[str],
        tasks: list[TaskConfig] | None,
        teacher_weights: list[float],
        image_size: int,
        device: torch.device,
        mix: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.mix = mix  # function matching: both models see the same mixed images
        self.teachers = teachers  # a plain list: not submodules (see module docstring)
        self.losses = list(losses)  # its own list: the resolved layers go in (not the config)
        self.teacher_weights = teacher_weights
        self.tasks = tasks or []
        self.task_index = [
            torch.tensor([classes.index(c) for c in t.classes], device=device) for t in self.tasks
        ]
        self.names = _part_names(losses)
        self.entries = [LOSSES[loss.type] for loss in losses]
        self.terms = nn.ModuleList(
            entry.load()(loss) for entry, loss in zip(self.entries, losses, strict=True)
        )
        self.device = device
        self.distilled = any(entry.head == "dist" for entry in self.entries)
        if self.distilled:
            _distilled_training(model, losses, self.entries)
        # per (teacher, task or None): which of the teacher's logits, in the student's order
        self.class_index: dict[tuple[int, int | None], torch.Tensor | None] = {}
        self._check_classes(classes)
        # feature layers: per loss, which student/teacher layers pair up
        self.pairs: dict[int, tuple[list[Layer], list[Layer], int]] = {}
        for i, (loss, entry) in enumerate(zip(losses, self.entries, strict=True)):
            if entry.inputs == "features":
                t = loss.teacher or 0
                key = f"distill.losses.{i}"
                kind = entry.layers
                s_layers = resolve_layers(model, loss.student_layers, f"{key}.student_layers", kind)
                t_layers = resolve_layers(
                    teachers[t].model, loss.teacher_layers, f"{key}.teacher_layers", kind
                )
                if len(s_layers) != len(t_layers):
                    raise ConfigError(key, "student_layers and teacher_layers must pair up")
                self.losses[i] = loss.model_copy(
                    update={"student_layers": s_layers, "teacher_layers": t_layers}
                )
                self.pairs[i] = (s_layers, t_layers, t)
        self.student_layers = _unique(lay for s, _, _ in self.pairs.values() for lay in s)
        self.student_tap = FeatureTap(model, self.student_layers) if self.student_layers else None
        self.teacher_layers: list[list[Layer]] = [[] for _ in teachers]
        for _, t_layers, t in self.pairs.values():
            self.teacher_layers[t] = _unique([*self.teacher_layers[t], *t_layers])
        for t, layers in enumerate(self.teacher_layers):
            if layers:
                teachers[t].use_layers(layers)
        if any(hasattr(self.terms[i], "build") for i in self.pairs):
            self._build_terms(model, image_size, device)
        used = {t for loss in losses for t in self._teachers_of(loss)}
        used |= {task.teacher for task in self.tasks}
        self.uses_teacher = [t in used for t in range(len(teachers))]
        self.epoch: int | None = None  # set by start_epoch (the dkd warm-up); None: no ramp
        # train_teacher_top1: the first used teacher that serves the student's classes
        self.metric_teacher = next(
            (
                t
                for t in range(len(teachers))
                if self.uses_teacher[t] and class_index(teachers[t], classes)[0]
            ),
            None,
        )
        if self.metric_teacher is not None:
            _, idx = class_index(teachers[self.metric_teacher], classes)
            self.class_index.setdefault((self.metric_teacher, None), _index_tensor(idx, device))
        self.teacher_val_top1: float | None = None  # of metric_teacher, set by the recipe
        self.log: Callable[[str], None] = print
        self._warned = False
        self._reset_counts()

    def _teachers_of(self, loss: LossConfig) -> list[int]:
        inputs = LOSSES[loss.type].inputs
        if inputs == "labels":
            return []
        if inputs == "features":
            return [loss.teacher or 0]
        if self.tasks:
            return [task.teacher for task in self.tasks]
        return [loss.teacher] if loss.teacher is not None else list(range(len(self.teachers)))

    def _check_classes(self, classes: list[str]) -> None:
        """Logit losses need teachers that predict the student's classes (per task: the
        task's classes), or a superset of them matched by name."""
        for i, (loss, entry) in enumerate(zip(self.losses, self.entries, strict=True)):
            if entry.inputs != "logits":
                continue
            if self.tasks:
                if entry.needs_labels or loss.teacher is not None:
                    why = "reads the labels" if entry.needs_labels else "with a teacher index"
                    raise ConfigError(
                        f"distill.losses.{i}",
                        f"{loss.type} {why} does not combine with distill.tasks "
                        "(each task has its teacher)",
                    )
                targets = [
                    (task.teacher, j, task.classes, f"distill.tasks.{j}")
                    for j, task in enumerate(self.tasks)
                ]
            else:
                targets = [
                    (t, None, classes, f"distill.losses.{i}") for t in self._teachers_of(loss)
                ]
            for t, task, want, key in targets:
                if getattr(loss, "standardize", None) and len(want) < 2:
                    raise ConfigError(  # the std of one logit: NaN
                        key,
                        f"{loss.type} with standardize z-scores the logits over the classes: "
                        f"needs two or more, not {want}",
                    )
                teacher = self.teachers[t]
                usable, idx = class_index(teacher, want)
                if not usable:
                    got = teacher.classes or f"{teacher.num_classes} classes"
                    raise ConfigError(
                        key,
                        f"{loss.type} needs teacher {t} ({teacher.name}) to predict the same "
                        f"classes {want} (or a superset, matched by name), but it predicts "
                        f"{got}; teach across tasks with fitnet or at instead",
                    )
                self.class_index[(t, task)] = _index_tensor(idx, self.device)

    @torch.no_grad()
    def _build_terms(self, model: nn.Module, image_size: int, device: torch.device) -> None:
        """Terms with trainable parts (``build``) get the paired feature shapes. A probe
        forward finds them: a layer may be any named module, whose output shape no metadata
        gives (timm's feature_info has channels and strides of stages only)."""
        probe = torch.zeros(2, 3, image_size, image_size, device=device)
        was_training = model.training
        model.eval()
        _, s_feats = self.student_tap(probe)
        model.train(was_training)
        s_by_layer = dict(zip(self.student_layers, s_feats, strict=True))
        for i, (s_layers, t_layers, t) in self.pairs.items():
            if not hasattr(self.terms[i], "build"):
                continue
            _, t_feats = self.teachers[t](probe)
            t_by_layer = dict(zip(self.teacher_layers[t], t_feats, strict=True))
            self.terms[i].build(
                [tuple(s_by_layer[lay].shape) for lay in s_layers],
                [tuple(t_by_layer[lay].shape) for lay in t_layers],
                f"distill.losses.{i}",
            )
            self.terms[i].to(device)

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        if self.mix is not None:
            images = self.mix(images)
        if self.student_tap is not None:
            logits, feats = self.student_tap(images)
            s_feat = dict(zip(self.student_layers, feats, strict=True))
        else:
            logits, s_feat = model(images), {}
        dist_logits = None
        if isinstance(logits, tuple):  # a DeiT student training its distillation head
            logits, dist_logits = logits
        elif self.distilled:  # as DeiT's DistillationLoss: an error, not a silent mix-up
            raise TlkdError(
                "the distillation token's loss needs the student's two heads, but it returned "
                "one output (set_distilled_training(True) and train mode give both)"
            )
        t_out = [
            teacher(images) if used else None
            for teacher, used in zip(self.teachers, self.uses_teacher, strict=True)
        ]
        counted = self.metric_teacher is not None and self.mix is None  # labels of mixed: none
        if counted and t_out[self.metric_teacher] is not None:
            self._count_teacher_hits(t_out[self.metric_teacher][0], targets)
        total = logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for i, loss in enumerate(self.losses):
            student = dist_logits if self.entries[i].head == "dist" else logits
            factor = self.warmup_factor(loss)
            value = self._term(i, loss, student, s_feat, t_out, targets) * factor
            parts[self.names[i]] = value.detach()
            # a term made of several (its ``parts``, e.g. rkd's distance and angle): each logged
            for sub, part in getattr(self.terms[i], "parts", {}).items():
                parts[f"{self.names[i]}_{sub}"] = part * factor
            total = total + loss.weight * value
        if dist_logits is not None:  # what the model predicts: the mean of its two heads
            logits = (logits + dist_logits) / 2
        return StepOutput(total, logits, parts)

    def _term(self, i, loss, logits, s_feat, t_out, targets) -> torch.Tensor:
        logits, term, entry = logits.float(), self.terms[i], self.entries[i]
        if entry.inputs == "labels":  # labelled rows only (data.unlabeled images come with -1)
            labelled = targets >= 0
            return term(logits[labelled], targets[labelled])
        if entry.inputs == "features":
            s_layers, t_layers, t = self.pairs[i]
            t_by_layer = dict(zip(self.teacher_layers[t], t_out[t][1], strict=True))
            return term(
                [s_feat[lay].float() for lay in s_layers],
                [t_by_layer[lay].float() for lay in t_layers],
            )
        if self.tasks:  # each task: its slice of the student's logits, its own teacher
            values = [
                self._logit_term(
                    i, logits[:, idx], [self._teacher_logits(t_out, task.teacher, j)], [1.0], None
                )
                for j, (task, idx) in enumerate(zip(self.tasks, self.task_index, strict=True))
            ]
            return torch.stack(values).mean()
        ids = self._teachers_of(loss)
        return self._logit_term(
            i,
            logits,
            [self._teacher_logits(t_out, t, None) for t in ids],
            [self.teacher_weights[t] for t in ids],
            targets,
        )

    def _teacher_logits(self, t_out, t: int, task: int | None) -> torch.Tensor:
        """Teacher ``t``'s logits for the student's classes (or task ``task``'s), in order."""
        logits = t_out[t][0].float()
        idx = self.class_index.get((t, task))
        return logits if idx is None else logits[:, idx]

    def warmup_factor(self, loss: LossConfig) -> float:
        """The linear warm-up of a loss with ``warmup_epochs`` (dkd, as mdistiller):
        ``min(epoch / warmup_epochs, 1)``, epochs counted from 1 (the epoch the trainer
        announced with :meth:`start_epoch`)."""
        warmup = getattr(loss, "warmup_epochs", None)
        if not warmup or self.epoch is None:
            return 1.0
        return min(self.epoch / warmup, 1.0)

    def _logit_term(self, i, student, teacher_logits, weights, targets) -> torch.Tensor:
        # several teachers: one target, the weighted mean of their softened probabilities at
        # this loss's temperature (T=1 for a loss without one), the same rule for every loss
        temperature = getattr(self.losses[i], "temperature", None) or 1.0
        # standardize (kd, dkd, dist; Sun et al. 2024): the student's logits z-scored, and
        # each teacher's before the ensemble; temperature is then the base temperature
        standardize = bool(getattr(self.losses[i], "standardize", None))
        if standardize:
            student = standardize_logits(student)
        teacher = ensemble_logits(teacher_logits, weights, temperature, standardize)
        return self.terms[i](student, teacher, targets if self.entries[i].needs_labels else None)

    # -- the teacher on the training views (train_teacher_top1) --

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch = epoch
        self._reset_counts()

    def _reset_counts(self) -> None:
        self._hits = torch.zeros((), dtype=torch.long, device=self.device)
        self._rows = torch.zeros((), dtype=torch.long, device=self.device)

    @torch.no_grad()
    def _count_teacher_hits(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Counted on the device (no sync per step); labelled rows only."""
        labelled = targets >= 0
        idx = self.class_index.get((self.metric_teacher, None))
        logits = logits[labelled] if idx is None else logits[labelled][:, idx]
        self._hits += (logits.argmax(dim=1) == targets[labelled]).sum()
        self._rows += labelled.sum()

    def train_metrics(self) -> dict[str, float | None]:
        """``train_teacher_top1``: the teacher's top-1 (percent) on the student's training
        views of this epoch (the cached logits with distill.cache). Far below its val top-1,
        the augmentation likely destroys what the teacher knows: warned once."""
        if self.metric_teacher is None:
            return {}
        hits, rows = distributed.all_sum([float(self._hits.item()), float(self._rows.item())])
        top1 = 100.0 * hits / rows if rows else None
        val = self.teacher_val_top1
        if top1 is not None and val is not None and top1 < val - VIEW_GAP_WARNING:
            if not self._warned and distributed.info().is_main:
                self.log(
                    f"warning: teacher {self.metric_teacher} gets {top1:.1f}% top-1 on the "
                    f"student's training views against {val:.1f}% on val: the augmentation "
                    "(data.augment) likely distorts the images beyond what the teacher "
                    "knows; its soft targets there are poor (try milder data.augment)"
                )
            self._warned = True
        return {"train_teacher_top1": top1}

    def val_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Per task: top-1 among the task's own classes, on the val images of that task."""
        out = {}
        for task, idx in zip(self.tasks, self.task_index, strict=True):
            idx = idx.cpu()
            member = targets[:, None] == idx[None, :]
            rows = member.any(dim=1)
            if rows.any():
                local = member[rows].float().argmax(dim=1)
                out[f"val_top1_{task.name}"] = topk_accuracy(logits[rows][:, idx], local, 1)
        return out


def _distilled_training(model: nn.Module, losses: list[LossConfig], entries: list) -> None:
    """Switch a DeiT student to return both heads' logits in training; refuse other models."""
    if not hasattr(model, "set_distilled_training"):
        i = next(i for i, e in enumerate(entries) if e.head == "dist")
        raise ConfigError(
            f"distill.losses.{i}",
            f"{losses[i].type} trains a distillation token: the student must have one, e.g. "
            f"timm's deit_tiny_distilled_patch16_224 (model {type(model).__name__} has none)",
        )
    model.set_distilled_training(True)


def _index_tensor(idx: list[int] | None, device: torch.device) -> torch.Tensor | None:
    return None if idx is None else torch.tensor(idx, device=device)


def _unique(items) -> list:
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _part_names(losses: list[LossConfig]) -> list[str]:
    """Metric names of the loss terms: the type, with the teacher and a counter if needed."""
    names = [
        loss.type + (f"_t{loss.teacher}" if loss.teacher is not None else "") for loss in losses
    ]
    return [
        n if names.count(n) == 1 else f"{n}_{names[:i].count(n) + 1}" for i, n in enumerate(names)
    ]
