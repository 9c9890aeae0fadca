"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on timm models,
through HuggingFace PEFT (``pip install 'tlkd[lora]'``).

Each target layer ``W`` (a plain ``nn.Linear``, or a plain zero-padded ``nn.Conv2d`` without
groups or dilation: :func:`unsupported`) gets a low-rank update: ``W x + (alpha / rank) *
B A x``, with ``A`` random (peft's Kaiming-uniform) and ``B`` zero at the start, so training
starts from the pretrained function. The backbone is frozen but for the adapters; the
classifier (both heads of a distilled DeiT) trains. peft's ``inject_adapter_in_model`` swaps
the target layers in place (their weights move to ``<layer>.base_layer.*``, the adapters are
``<layer>.lora_A.default.weight`` and ``lora_B``), so the model keeps its class and its
other names. Checkpoints hold that unmerged state (a resume is exact); the weights tlkd saves
(``model.safetensors``, ``start.safetensors``) have the update merged into ``W`` under timm's
own names (:func:`merged_state_dict`), a plain state dict that timm alone loads.
"""

from __future__ import annotations

import re
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tlkd.config.schema import LoraConfig
from tlkd.config.suggest import did_you_mean
from tlkd.errors import ConfigError
from tlkd.models.head import classifier_names, is_head_key

INSTALL_HINT = "pip install 'tlkd[lora]'"
# timm's ViT family (vit, deit, swin, eva, beit, ...): attention and MLP projections, as the
# LoRA paper's attention weights plus the MLP; a dotted suffix, so a ViT's patch_embed.proj
# (a Conv2d named proj) is left alone
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
LAYERS = (nn.Linear, nn.Conv2d)
ADAPTER = "default"  # peft's adapter name


@dataclass
class LoraReport:
    """What :func:`apply_lora` did: the adapted layers and the parameters that train."""

    modules: list[str]
    rank: int
    alpha: float
    adapter_params: int = 0
    head_params: int = 0
    targets: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def plan_line(self, total: int) -> str:
        trainable = self.adapter_params + self.head_params
        return (
            f"lora        rank {self.rank}, alpha {self.alpha:g} (scale {self.scale:g}) on "
            f"{len(self.modules)} layers: {compact_names(self.modules)}; trains "
            f"{trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%: "
            f"{self.adapter_params:,} adapter, {self.head_params:,} classifier); the saved "
            "weights have the adapters merged in"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": self.targets,
            "modules": self.modules,
            "adapter_params": self.adapter_params,
            "merged_in_saved_weights": True,
        }


def require_peft() -> None:
    """A ConfigError (exit 2) naming the extra to install when peft is missing."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(
            "model.lora", f"needs the peft library, which is not installed: {INSTALL_HINT}"
        ) from None


def is_adapter(name: str) -> bool:
    """Whether a parameter or module name is inside a LoRA adapter (peft's ``lora_*``)."""
    return any(part.startswith("lora_") for part in name.split("."))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Names of the Linear/Conv2d layers (outside the classifier) that ``targets`` name: each
    target a module name or a dotted suffix of one; a target that names no such layer is a
    ConfigError with a did-you-mean, and so is a named layer LoRA cannot adapt exactly
    (:func:`unsupported`). ``None``: the ViT layers of DEFAULT_TARGETS."""
    heads = classifier_names(model)
    modules = dict(model.named_modules())
    layers = [
        n for n, m in modules.items() if n and isinstance(m, LAYERS) and not is_head_key(n, heads)
    ]
    if targets is None:
        found = [n for n in layers if any(_matches(n, t) for t in DEFAULT_TARGETS)]
        if not found:
            raise ConfigError(
                "model.lora.targets",
                f"the model has none of the default targets ({', '.join(DEFAULT_TARGETS)}, "
                f"a ViT's): name its Linear or Conv2d layers, e.g. {_examples(layers)}",
            )
        return _supported(found, modules)
    for target in targets:
        if any(_matches(n, target) for n in layers):
            continue
        others = [n for n, m in modules.items() if n and _matches(n, target)]
        if others:
            what = (
                "the classifier, which trains whole"
                if is_head_key(others[0], heads)
                else f"a {type(modules[others[0]]).__name__} module"
            )
            raise ConfigError(
                "model.lora.targets",
                f"{target!r} names {others[0]}, {what}; LoRA adapts the backbone's Linear and "
                f"Conv2d layers, e.g. {_examples(layers)}",
            )
        raise ConfigError(
            "model.lora.targets",
            f"{target!r} names no Linear or Conv2d layer of the model"
            f"{did_you_mean(target, _suffixes(layers)) or ', e.g. ' + _examples(layers)}",
        )
    return _supported([n for n in layers if any(_matches(n, t) for t in targets)], modules)


def unsupported(module: nn.Module) -> str | None:
    """Why LoRA cannot adapt ``module`` exactly (None: it can). peft's LoRA layer wraps any
    Linear or Conv2d, but its adapters and tlkd's merge (``W + scale B A``, loaded into a plain
    layer) reproduce only the plain layers' forward: an exact ``nn.Linear``, or an exact
    ``nn.Conv2d`` without groups or dilation, zero-padded (peft's adapter convolution takes the
    kernel, stride and padding alone). Subclasses with a forward of their own (timm's
    StdConv2d standardises its weight, Conv2dSame pads on the fly) would merge wrongly."""
    kind = type(module)
    if kind is nn.Linear:
        return None
    if kind is nn.Conv2d:
        settings = []
        if module.groups != 1:
            settings.append(f"groups={module.groups}")
        if tuple(module.dilation) != (1, 1):
            settings.append(f"dilation={tuple(module.dilation)}")
        if module.padding_mode != "zeros":
            settings.append(f"padding_mode={module.padding_mode!r}")
        if not settings:
            return None
        return f"a Conv2d with {', '.join(settings)}"
    return f"a {kind.__module__}.{kind.__qualname__} (a subclass with its own forward)"


def _supported(names: list[str], modules: dict[str, nn.Module]) -> list[str]:
    """``names``, each checked by :func:`unsupported`: the first that LoRA cannot adapt is a
    ConfigError naming it."""
    for name in names:
        why = unsupported(modules[name])
        if why is not None:
            raise ConfigError(
                "model.lora.targets",
                f"{name} is {why}; LoRA adapts plain nn.Linear layers and plain zero-padded "
                "nn.Conv2d layers without groups or dilation, whose merged weights compute "
                "the same function: target other layers",
            )
    return names


def _suffixes(names: list[str]) -> set[str]:
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return out


def _examples(layers: list[str], n: int = 4) -> str:
    """The most common layer suffixes (``attn.qkv``, ``conv1``, ...) as examples."""
    common = Counter(".".join(n.split(".")[-2:]) for n in layers).most_common(n)
    return ", ".join(name for name, _ in common) or "(none: the model has no such layer)"


def compact_names(names: list[str], limit: int = 6) -> str:
    """``blocks.*.attn.qkv (12), ...``: numbered parts folded, with counts, in first order."""
    folded = Counter(re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", n) for n in names)
    shown = [f"{k} ({c})" if c > 1 else k for k, c in folded.items()]
    more = f", ... ({len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def apply_lora(model: nn.Module, cfg: LoraConfig) -> LoraReport:
    """Inject peft's LoRA layers into ``model`` in place; only the adapters and the
    classifier(s) keep ``requires_grad`` (the Freezer keeps it so)."""
    require_peft()
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    names = lora_targets(model, cfg.targets)
    heads = classifier_names(model)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=names,  # full names: exactly these layers
        bias="none",
        init_lora_weights=True,  # A Kaiming-uniform, B zero
    )
    inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    report = LoraReport(names, cfg.rank, cfg.alpha, targets=list(cfg.targets or DEFAULT_TARGETS))
    for name, param in model.named_parameters():
        adapter, head = is_adapter(name), is_head_key(name, heads)
        param.requires_grad_(adapter or head)
        if adapter:
            report.adapter_params += param.numel()
        elif head:
            report.head_params += param.numel()
    return report


def has_lora(model: nn.Module) -> bool:
    """Whether peft injected adapters into ``model`` (it records its config there)."""
    return hasattr(model, "peft_config")


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA update merged into its layer's weight, under
    timm's own names (no ``base_layer``, no adapters), on the CPU; what peft's
    ``merge_and_unload`` would leave, without changing ``model``."""
    from peft.tuners.lora import LoraLayer

    lora = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = next((n for n in lora if key.startswith(n + ".")), None)
        if owner is not None:
            rest = key[len(owner) + 1 :]
            if is_adapter(rest):
                continue
            rest = rest.removeprefix("base_layer.")
            if rest == "weight":
                layer = lora[owner]
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A and not layer.merged:
                        value = value + layer.get_delta_weight(adapter).to(value.dtype)
            key = f"{owner}.{rest}"
        out[key] = value.detach().to("cpu", copy=True).contiguous()
    return out


def merged_checkpoint(
    model: nn.Module, cfg: LoraConfig, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The merged weights of a LoRA run's checkpointed model ``state`` (unmerged: base layers
    and adapters), given a plain ``model`` of the run's architecture (left unchanged)."""
    adapted = deepcopy(model).cpu()
    apply_lora(adapted, cfg)
    adapted.load_state_dict(state)
    return merged_state_dict(adapted)
