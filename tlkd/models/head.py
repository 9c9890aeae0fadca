"""Replace a timm model's classifier with new layers."""

from __future__ import annotations

from torch import nn

from tlkd.config.schema import HeadConfig
from tlkd.errors import ConfigError

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def classifier_name(model: nn.Module) -> str:
    """Dotted name of the model's final classifier module, as timm's pretrained_cfg records it."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    if isinstance(name, (tuple, list)):  # distilled models have two heads; the first is the main
        name = name[0]
    if not name:
        raise ConfigError("model.name", "timm does not record this model's classifier module")
    return name


def replace_head(model: nn.Module, head: HeadConfig, num_classes: int) -> None:
    """Swap the classifier (already sized for ``num_classes`` by timm) for hidden layers,
    activation and dropout ending in a Linear layer. State-dict keys stay under the
    classifier's own name, so the backbone's keys are timm's."""
    name = classifier_name(model)
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ConfigError(
            "model.head", f"needs a Linear classifier; {name} is a {type(old).__name__}"
        )
    layers: list[nn.Module] = []
    width = old.in_features
    for hidden in head.hidden:
        layers += [nn.Linear(width, hidden), _ACTIVATIONS[head.activation]()]
        if head.dropout:
            layers.append(nn.Dropout(head.dropout))
        width = hidden
    if head.dropout and not head.hidden:
        layers.append(nn.Dropout(head.dropout))
    layers.append(nn.Linear(width, num_classes))
    model.set_submodule(name, nn.Sequential(*layers))
