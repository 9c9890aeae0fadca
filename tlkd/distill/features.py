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
