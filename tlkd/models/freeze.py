"""Freezing parts of a model, keeping BatchNorm statistics of frozen parts fixed.

timm.utils.freeze swaps BatchNorm for FrozenBatchNorm2d, which replaces parameter objects:
the optimizer and scheduler built over them would no longer see the model's parameters after
a later unfreeze (fastai-style ``unfreeze_after``). So freezing here keeps every module in
place: frozen parameters stop requiring gradients (the optimizer skips parameters without
gradients) and frozen BatchNorm layers are held in eval mode while the rest trains.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tlkd.config.schema import ModelConfig
from tlkd.config.suggest import did_you_mean
from tlkd.errors import ConfigError
from tlkd.models.head import classifier_names
from tlkd.models.lora import is_adapter


class Freezer:
    """Applies ``model.freeze`` and ``model.unfreeze_after``; call :meth:`train_mode` instead
    of ``model.train()`` so frozen BatchNorm layers stay in eval mode."""

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        self.model = model
        # model.lora: the backbone is frozen but for the LoRA adapters inside it
        self.lora = cfg.lora is not None
        self.prefixes = self._prefixes(model, "backbone" if self.lora else cfg.freeze)
        self.keep_bn_stats = cfg.freeze_bn_stats
        self.frozen = False
        if self.prefixes:
            self.set_frozen(True)

    @staticmethod
    def _prefixes(model: nn.Module, spec: str | list[str]) -> list[str]:
        if spec == "none":
            return []
        if spec == "backbone":
            # everything but the classifier: its siblings (modules and loose parameters such as
            # ViT's cls_token) on the path down from the root
            # (every classifier: a distilled DeiT's head and head_dist both stay trainable)
            heads = classifier_names(model)
            parts = [h.split(".") for h in heads]
            on_path = {".".join(p[:i]) for p in parts for i in range(len(p) + 1)}
            prefixes = []
            for parent in sorted(p for p in on_path if p not in heads):
                module = model.get_submodule(parent)
                children = [_join(parent, n) for n, _ in module.named_children()]
                prefixes += [c for c in children if c not in on_path]
                prefixes += [_join(parent, n) for n, _ in module.named_parameters(recurse=False)]
            return prefixes
        names = [n for n, _ in model.named_modules() if n]
        for prefix in spec:
            if prefix not in names:
                raise ConfigError(
                    "model.freeze",
                    f"no module named {prefix!r} in the model{did_you_mean(prefix, names)}",
                )
        return list(spec)

    def _is_frozen(self, name: str) -> bool:
        if self.lora and is_adapter(name):
            return False
        return any(_under(name, p) for p in self.prefixes)

    def set_frozen(self, frozen: bool) -> None:
        self.frozen = frozen
        for name, param in self.model.named_parameters():
            if self._is_frozen(name):
                param.requires_grad_(not frozen)

    def train_mode(self) -> None:
        self.model.train()
        if self.frozen and self.keep_bn_stats:
            for name, module in self.model.named_modules():
                if isinstance(module, _BatchNorm) and self._is_frozen(name):
                    module.eval()


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child
