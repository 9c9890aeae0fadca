"""Intermediate features of timm models, chosen by stage index or module name."""

from __future__ import annotations

import torch
from torch import nn

from tlkd.config.suggest import did_you_mean
from tlkd.errors import ConfigError

Layer = int | str


HINT_LAYER = 2  # FitNet's default hint: RepDistiller's hint_layer=2 (see resolve_layers)
PRE_LOGITS = "pre_logits"  # the pooled features the classifier reads (timm's pre_logits)


def resolve_layers(
    model: nn.Module, layers: list[Layer] | None, key: str, kind: str = "stages"
) -> list[Layer]:
    """Check layer choices against the model, or choose them by the loss's ``kind``:

    - ``stages`` (at): its last three feature stages;
    - ``hint`` (fitnet): the one stage at index 2 of ``feature_info`` (the stem is 0), the
      layer RepDistiller's ``hint_layer=2`` picks: for the CIFAR ResNets the output of the
      second of the three residual stages (the last stage if the model has fewer);
    - ``last`` (sp): the last stage's feature map (RepDistiller's ``feat[-2]``);
    - ``embedding`` (rkd, pkt, crd): ``pre_logits``, the pooled, flattened features the
      classifier reads (RepDistiller's ``feat[-1]``; timm's ``forward_head(pre_logits=True)``);
    - ``review`` (reviewkd): the last three feature stages and ``pre_logits``, shallow to deep
      (mdistiller's CIFAR ReviewKD: the three residual stages' outputs and the pooled feature).
    """
    stages = len(getattr(model, "feature_info", []) or [])
    if layers is None:
        if kind == "embedding":
            return [PRE_LOGITS]
        if stages == 0:
            raise ConfigError(key, "the model reports no feature stages; name modules instead")
        if kind == "hint":
            return [min(HINT_LAYER, stages - 1)]
        if kind == "last":
            return [stages - 1]
        if kind == "review":
            return [*range(max(0, stages - 3), stages), PRE_LOGITS]
        return list(range(max(0, stages - 3), stages))
    names = [n for n, _ in model.named_modules() if n]
    for layer in layers:
        if isinstance(layer, int) and not 0 <= layer < stages:
            raise ConfigError(
                key, f"stage {layer} does not exist (the model has {stages}: 0..{stages - 1})"
            )
        if isinstance(layer, str) and layer != PRE_LOGITS and layer not in names:
            raise ConfigError(
                key,
                f"no module named {layer!r} in the model"
                f"{did_you_mean(layer, [*names, PRE_LOGITS])}",
            )
    return list(layers)


class FeatureTap:
    """Runs a model and returns ``(logits, [features of the chosen layers])``. Stage indices
    use timm's ``forward_intermediates``; module names use forward hooks; ``pre_logits`` is
    the input of the classifier (``get_classifier()``, a forward pre-hook), so the logits
    still come from the model's own head."""

    def __init__(self, model: nn.Module, layers: list[Layer]) -> None:
        self.model = model
        self.layers = layers
        self.indices = sorted({layer for layer in layers if isinstance(layer, int)})
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [
            model.get_submodule(name).register_forward_hook(self._capture(name))
            for name in {layer for layer in layers if isinstance(layer, str)} - {PRE_LOGITS}
        ]
        if PRE_LOGITS in layers:
            head = model.get_classifier()
            head = head[0] if isinstance(head, tuple) else head  # DeiT distilled: the class head
            self._hooks.append(head.register_forward_pre_hook(self._capture_input))

    def _capture(self, name: str):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._captured[name] = output

        return hook

    def _capture_input(self, _module: nn.Module, inputs: tuple) -> None:
        self._captured[PRE_LOGITS] = inputs[0]

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
