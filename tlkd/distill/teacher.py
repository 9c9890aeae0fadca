"""Teachers: frozen models that never change and run without autograd.

timm.task.DistillationTeacher covers a hub teacher's logits; tlkd also needs teachers that
are tlkd run directories (with their own heads and classes), intermediate features, and an
optional train-mode BatchNorm, so the wrapper is written here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tlkd.config import safe_yaml
from tlkd.config.loader import effective, validate
from tlkd.config.schema import ModelConfig, TeacherConfig
from tlkd.distill.features import FeatureTap, Layer
from tlkd.errors import ConfigError
from tlkd.models.factory import (
    build_model,
    check_model_name,
    load_weights,
    read_state_dict,
    weights_file,
)
from tlkd.models.head import classifier_name
from tlkd.run.rundir import CONFIG, SUMMARY


class Teacher:
    """A frozen model; call it on the student's (normalised) batch."""

    def __init__(
        self,
        model: nn.Module,
        classes: list[str] | None,
        name: str,
        train_bn: bool,
        student_mean: tuple[float, ...],
        student_std: tuple[float, ...],
    ) -> None:
        self.model = model.requires_grad_(False).eval()
        self.classes = classes  # None when unknown (a plain weights file or the hub)
        self.num_classes = (
            model.get_classifier().out_features
            if hasattr(model.get_classifier(), "out_features")
            else getattr(model, "num_classes", None)
        )
        self.name = name
        if train_bn:  # batch statistics, without touching the running statistics
            for m in model.modules():
                if isinstance(m, _BatchNorm):
                    m.train()
                    m.track_running_stats = False
        cfg = model.pretrained_cfg
        mean_t, std_t = tuple(cfg.get("mean", student_mean)), tuple(cfg.get("std", student_std))
        # the batch is normalised for the student; re-normalise it for the teacher if needed
        self.renorm = None
        if (mean_t, std_t) != (tuple(student_mean), tuple(student_std)):
            s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
            t_mean, t_std = torch.tensor(mean_t), torch.tensor(std_t)
            scale = (s_std / t_std).view(1, -1, 1, 1)
            shift = ((s_mean - t_mean) / t_std).view(1, -1, 1, 1)
            self.renorm = (scale, shift)
        self.tap: FeatureTap | None = None
        self.runtime = "torch"  # tlkd/distill/runtime.py; set_runtime changes it
        self._ort: Callable[[torch.Tensor], torch.Tensor] | None = None

    def set_runtime(self, runtime: str, example: torch.Tensor) -> None:
        """Run the forward pass as ``runtime`` says (channels_last moves the model; onnxruntime
        exports it, for logits only). ``example``: a batch of the run's shape."""
        from tlkd.distill.runtime import OrtForward

        self.runtime = runtime
        layout = torch.channels_last if runtime == "channels_last" else torch.contiguous_format
        self.model.to(memory_format=layout)
        self._ort = OrtForward(self.model, example) if runtime == "onnxruntime" else None

    def to(self, device: torch.device) -> Teacher:
        self.model.to(device)
        if self.renorm is not None:
            self.renorm = tuple(t.to(device) for t in self.renorm)
        return self

    def use_layers(self, layers: list[Layer]) -> None:
        self.tap = FeatureTap(self.model, layers)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._ort is not None:  # onnxruntime: numpy in, a new (plain) tensor out
            with torch.no_grad():
                if self.renorm is not None:
                    images = images * self.renorm[0] + self.renorm[1]
                return self._ort(images), []
        with torch.inference_mode():
            if self.renorm is not None:
                images = images * self.renorm[0] + self.renorm[1]
            if self.runtime == "channels_last":
                images = images.contiguous(memory_format=torch.channels_last)
            if self.tap is not None:
                logits, feats = self.tap(images)
            else:
                logits, feats = self.model(images), []
        # inference tensors cannot take part in the student's autograd graph: copy them out
        return logits.clone(), [f.clone() for f in feats]

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def build_teacher(cfg: TeacherConfig, key: str, student_mean: tuple, student_std: tuple) -> Teacher:
    """Build a teacher from a tlkd run directory (its own config, head and classes), a weights
    file (class count read from the classifier) or timm's hub weights."""
    check_model_name(cfg.name)
    classes = None
    if isinstance(cfg.pretrained, str) and Path(cfg.pretrained).is_dir():
        run = Path(cfg.pretrained)
        file = weights_file(run, f"{key}.pretrained")
        if (run / CONFIG).is_file():
            saved = validate(safe_yaml.safe_load((run / CONFIG).read_text()))
            run_cfg = effective(saved).model
            if run_cfg.name != cfg.name:
                raise ConfigError(
                    f"{key}.name",
                    f"is {cfg.name!r} but the run {run.name} trained {run_cfg.name!r}",
                )
            classes = json.loads((run / SUMMARY).read_text())["classes"]
            model_cfg = run_cfg.model_copy(
                update={"pretrained": str(run), "kwargs": run_cfg.kwargs}
            )
            model, _ = build_model(model_cfg, len(classes), classes)
        else:
            model = _from_file(cfg, file, key)
    elif isinstance(cfg.pretrained, str):
        model = _from_file(cfg, weights_file(cfg.pretrained, f"{key}.pretrained"), key)
    else:
        if cfg.pretrained is False:
            raise ConfigError(f"{key}.pretrained", "a teacher needs trained weights")
        model, _ = build_model(
            ModelConfig(name=cfg.name, pretrained=True, kwargs=cfg.kwargs), None, None
        )
    return Teacher(model, classes, cfg.name, cfg.train_bn, student_mean, student_std)


def _from_file(cfg: TeacherConfig, file: Path, key: str) -> nn.Module:
    """A teacher from a weights file: its class count comes from the classifier's weights."""
    probe = timm.create_model(cfg.name, pretrained=False, **cfg.kwargs)
    head = classifier_name(probe)
    state = read_state_dict(file, f"{key}.pretrained")
    weight = state.get(f"{head}.weight")
    num_classes = int(weight.shape[0]) if weight is not None else probe.num_classes
    model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **cfg.kwargs)
    load_weights(model, file, key=f"{key}.pretrained")
    return model
