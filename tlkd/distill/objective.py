"""The distillation objective: a weighted sum of loss terms over student and teacher outputs.

It plugs into the same training loop as finetune. Adapters (FitNet) are submodules of the
objective: the optimizer trains them with the student, checkpoints keep them, and the saved
student weights (the model alone) do not contain them. Teachers are deliberately not
submodules, so they are neither optimised nor written into checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.config.schema import LossConfig, TaskConfig
from tlkd.distill import losses as L
from tlkd.distill.features import Adapter, FeatureTap, Layer, resolve_layers
from tlkd.distill.teacher import Teacher
from tlkd.engine.inference import topk_accuracy
from tlkd.engine.objectives import Objective, StepOutput
from tlkd.errors import ConfigError

LOGIT_LOSSES = {"kd", "hard", "dkd", "dist"}
FEATURE_LOSSES = {"fitnet", "at"}


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
    ) -> None:
        super().__init__()
        self.teachers = teachers  # a plain list: not submodules (see module docstring)
        self.losses = losses
        self.teacher_weights = teacher_weights
        self.tasks = tasks or []
        self.task_index = [
            torch.tensor([classes.index(c) for c in t.classes], device=device) for t in self.tasks
        ]
        self.names = _part_names(losses)
        self._check_classes(classes)
        # feature layers: per loss, which student/teacher layers pair up
        self.pairs: dict[int, tuple[list[Layer], list[Layer], int]] = {}
        for i, loss in enumerate(losses):
            if loss.type in FEATURE_LOSSES:
                t = loss.teacher or 0
                key = f"distill.losses.{i}"
                s_layers = resolve_layers(model, loss.student_layers, f"{key}.student_layers")
                t_layers = resolve_layers(
                    teachers[t].model, loss.teacher_layers, f"{key}.teacher_layers"
                )
                if len(s_layers) != len(t_layers):
                    raise ConfigError(key, "student_layers and teacher_layers must pair up")
                # record the resolved layers in the config (the list is the config's own)
                losses[i] = loss.model_copy(
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
        self.adapters = nn.ModuleDict()
        if any(loss.type == "fitnet" for loss in losses):
            self._build_adapters(model, image_size, device)
        used = {t for loss in losses for t in self._teachers_of(loss)}
        used |= {task.teacher for task in self.tasks}
        self.uses_teacher = [t in used for t in range(len(teachers))]

    def _teachers_of(self, loss: LossConfig) -> list[int]:
        if loss.type == "ce":
            return []
        if loss.type in FEATURE_LOSSES:
            return [loss.teacher or 0]
        if self.tasks:
            return [task.teacher for task in self.tasks]
        return [loss.teacher] if loss.teacher is not None else list(range(len(self.teachers)))

    def _check_classes(self, classes: list[str]) -> None:
        """Logit losses need teachers that predict the student's classes (per task: the
        task's classes)."""
        for i, loss in enumerate(self.losses):
            if loss.type not in LOGIT_LOSSES:
                continue
            if self.tasks:
                if loss.type == "dkd" or loss.teacher is not None:
                    raise ConfigError(
                        f"distill.losses.{i}",
                        f"{loss.type} with a teacher index or dkd "
                        "does not combine with distill.tasks (each task has its teacher)",
                    )
                targets = [
                    (task.teacher, task.classes, f"distill.tasks.{j}")
                    for j, task in enumerate(self.tasks)
                ]
            else:
                targets = [(t, classes, f"distill.losses.{i}") for t in self._teachers_of(loss)]
            for t, want, key in targets:
                teacher = self.teachers[t]
                same = (
                    teacher.classes == want
                    if teacher.classes is not None
                    else (teacher.num_classes == len(want))
                )
                if not same:
                    got = teacher.classes or f"{teacher.num_classes} classes"
                    raise ConfigError(
                        key,
                        f"{loss.type} needs teacher {t} ({teacher.name}) to predict the same "
                        f"classes {want}, but it predicts {got}; teach across tasks with "
                        "fitnet or at instead",
                    )

    @torch.no_grad()
    def _build_adapters(self, model: nn.Module, image_size: int, device: torch.device) -> None:
        probe = torch.zeros(2, 3, image_size, image_size, device=device)
        was_training = model.training
        model.eval()
        _, s_feats = self.student_tap(probe)
        model.train(was_training)
        s_by_layer = dict(zip(self.student_layers, s_feats, strict=True))
        for i, (s_layers, t_layers, t) in self.pairs.items():
            if self.losses[i].type != "fitnet":
                continue
            _, t_feats = self.teachers[t](probe)
            t_by_layer = dict(zip(self.teacher_layers[t], t_feats, strict=True))
            for j, (sl, tl) in enumerate(zip(s_layers, t_layers, strict=True)):
                s, tt = s_by_layer[sl], t_by_layer[tl]
                if s.dim() != 4 or tt.dim() != 4:
                    raise ConfigError(f"distill.losses.{i}", "fitnet needs NCHW feature maps")
                self.adapters[f"{i}_{j}"] = Adapter(
                    s.shape[1], tt.shape[1], tuple(tt.shape[-2:])
                ).to(device)

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        if self.student_tap is not None:
            logits, feats = self.student_tap(images)
            s_feat = dict(zip(self.student_layers, feats, strict=True))
        else:
            logits, s_feat = model(images), {}
        t_out = [
            teacher(images) if used else None
            for teacher, used in zip(self.teachers, self.uses_teacher, strict=True)
        ]
        total = logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        for i, loss in enumerate(self.losses):
            value = self._term(i, loss, logits, s_feat, t_out, targets)
            parts[self.names[i]] = value.detach()
            total = total + loss.weight * value
        return StepOutput(total, logits, parts)

    def _term(self, i, loss, logits, s_feat, t_out, targets) -> torch.Tensor:
        logits = logits.float()
        if loss.type == "ce":  # labelled rows only (data.unlabeled images come with -1)
            labelled = targets >= 0
            return F.cross_entropy(
                logits[labelled], targets[labelled], label_smoothing=loss.label_smoothing
            )
        if loss.type in FEATURE_LOSSES:
            s_layers, t_layers, t = self.pairs[i]
            t_by_layer = dict(zip(self.teacher_layers[t], t_out[t][1], strict=True))
            s = [s_feat[lay].float() for lay in s_layers]
            tt = [t_by_layer[lay].float() for lay in t_layers]
            if loss.type == "at":
                return L.at_loss(s, tt, loss.p)
            s = [self.adapters[f"{i}_{j}"](x) for j, x in enumerate(s)]
            return L.fitnet_loss(s, tt)
        if self.tasks:  # each task: its slice of the student's logits, its own teacher
            values = [
                self._logit_term(
                    loss, logits[:, idx], [t_out[task.teacher][0].float()], [1.0], None
                )
                for task, idx in zip(self.tasks, self.task_index, strict=True)
            ]
            return torch.stack(values).mean()
        ids = self._teachers_of(loss)
        return self._logit_term(
            loss,
            logits,
            [t_out[t][0].float() for t in ids],
            [self.teacher_weights[t] for t in ids],
            targets,
        )

    @staticmethod
    def _logit_term(loss, student, teacher_logits, weights, targets) -> torch.Tensor:
        total = sum(weights)
        if loss.type == "kd":
            if len(teacher_logits) == 1:
                return L.kd_loss(student, teacher_logits[0], loss.temperature)
            probs = (
                sum(
                    w * F.softmax(t / loss.temperature, dim=1)
                    for w, t in zip(weights, teacher_logits, strict=True)
                )
                / total
            )
            return L.kd_loss_from_probs(student, probs, loss.temperature)
        if loss.type == "hard":
            probs = sum(
                w * F.softmax(t, dim=1) for w, t in zip(weights, teacher_logits, strict=True)
            )
            return F.cross_entropy(student, probs.argmax(dim=1))
        # several teachers for dkd/dist: their weighted mean logits
        mean = sum(w * t for w, t in zip(weights, teacher_logits, strict=True)) / total
        if loss.type == "dkd":
            return L.dkd_loss(student, mean, targets, loss.alpha, loss.beta, loss.temperature)
        return L.dist_loss(student, mean, loss.beta, loss.gamma, loss.temperature)

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
