"""Intermediate features of timm models, chosen by stage index or module name."""

from __future__ import annotations

import torch
from torch import nn

from tlkd.config.suggest import did_you_mean
from tlkd.errors import ConfigError

Layer = int | str


HINT_LAYER = 2  # FitNet's default hint: RepDistiller's hint_layer=2 (see resolve_layers)


def resolve_layers(
    model: nn.Module, layers: list[Layer] | None, key: str, hint: bool = False
) -> list[Layer]:
    """Check layer choices against the model. Default: its last three feature stages (at), or
    with ``hint`` (fitnet) the one stage at index 2 of ``feature_info`` (the stem is 0), the
    layer RepDistiller's ``hint_layer=2`` picks: for the CIFAR ResNets the output of the
    second of the three residual stages (the last stage if the model has fewer)."""
    stages = len(getattr(model, "feature_info", []) or [])
    if layers is None:
        if stages == 0:
            raise ConfigError(key, "the model reports no feature stages; name modules instead")
        if hint:
            return [min(HINT_LAYER, stages - 1)]
        return list(range(max(0, stages - 3), stages))
    names = [n for n, _ in model.named_modules() if n]
    for layer in layers:
        if isinstance(layer, int) and not 0 <= layer < stages:
            raise ConfigError(
                key, f"stage {layer} does not exist (the model has {stages}: 0..{stages - 1})"
            )
        if isinstance(layer, str) and layer not in names:
            raise ConfigError(
                key, f"no module named {layer!r} in the model{did_you_mean(layer, names)}"
            )
    return list(layers)


class FeatureTap:
    """Runs a model and returns ``(logits, [features of the chosen layers])``. Stage indices
    use timm's ``forward_intermediates``; module names use forward hooks."""

    def __init__(self, model: nn.Module, layers: list[Layer]) -> None:
        self.model = model
        self.layers = layers
        self.indices = sorted({layer for layer in layers if isinstance(layer, int)})
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [
            model.get_submodule(name).register_forward_hook(self._capture(name))
            for name in {layer for layer in layers if isinstance(layer, str)}
        ]

    def _capture(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._captured[name] = output

        return hook

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._captured = {}
        if self.indices:
            final, inter = self.model.forward_intermediates(images, indices=self.indices)
            logits = self.model.forward_head(final)
            by_index = dict(zip(self.indices, inter, strict=True))
        else:
            logits, by_index = self.model(images), {}
        feats = [
            by_index[lay] if isinstance(lay, int) else self._captured[lay] for lay in self.layers
        ]
        return logits, feats

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


class ConvReg(nn.Module):
    """FitNet regressor as RepDistiller's ``ConvReg`` (``models/util.py``): a convolution
    chosen by the spatial sizes, then BatchNorm and ReLU, mapping student channels to the
    teacher's. A student map twice the teacher's: 3x3 conv, stride 2; half: 4x4 transposed
    conv, stride 2; otherwise, at least as large: a conv with kernel ``1 + s - t`` (1x1 at the
    same size); a smaller student map of another ratio is an error, as in the reference."""

    def __init__(
        self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], key: str = "fitnet"
    ) -> None:
        super().__init__()
        _, s_c, s_h, s_w = student_shape
        _, t_c, t_h, t_w = teacher_shape
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ConfigError(
                key,
                f"the student's {s_h}x{s_w} feature map is smaller than the teacher's "
                f"{t_h}x{t_w} (and not half of it): the FitNet regressor cannot map it; pick "
                "layers of matching resolution (student_layers, teacher_layers)",
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))
