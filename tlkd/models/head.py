"""Replace a timm model's classifier with new layers."""

from __future__ import annotations

from timm.layers import get_act_layer
from torch import nn

from tlkd.config.schema import HeadConfig
from tlkd.errors import ConfigError


def classifier_names(model: nn.Module) -> list[str]:
    """Dotted names of the model's classifier modules, as timm's pretrained_cfg records them:
    one, or two for distilled models (DeiT: ``head`` and ``head_dist``)."""
    name = getattr(model, "pretrained_cfg", {}).get("classifier")
    names = list(name) if isinstance(name, (tuple, list)) else [name]
    if not all(names):
        raise ConfigError("model.name", "timm does not record this model's classifier module")
    return names


def classifier_name(model: nn.Module) -> str:
    """The main classifier (the first of :func:`classifier_names`)."""
    return classifier_names(model)[0]


def is_head_key(key: str, heads: list[str]) -> bool:
    """Whether a state-dict key or module name belongs to one of the classifiers ``heads``."""
    return any(key == h or key.startswith(h + ".") for h in heads)


def feature_width(model: nn.Module) -> int:
    """Width of the feature vector the classifier reads, which is what the model returns
    with ``num_classes=0``: timm's ``head_hidden_size``. Not ``num_features`` (the width
    before the head), which is narrower where the head has a layer of its own before the
    classifier (MobileNetV3/V4, GhostNet, EfficientViT, HGNetV2)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


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
        layers += [nn.Linear(width, hidden), get_act_layer(head.activation)()]
        if head.dropout:
            layers.append(nn.Dropout(head.dropout))
        width = hidden
    if head.dropout and not head.hidden:
        layers.append(nn.Dropout(head.dropout))
    layers.append(nn.Linear(width, num_classes))
    model.set_submodule(name, nn.Sequential(*layers))
