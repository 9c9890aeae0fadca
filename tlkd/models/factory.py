"""Build a model from the timm registry with its weights and a head for the data's classes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import load_state_dict
from torch import nn

from tlkd.config.schema import ModelConfig
from tlkd.config.suggest import did_you_mean
from tlkd.errors import ConfigError, TlkdError
from tlkd.models.head import classifier_name, replace_head

WEIGHTS_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass
class WeightsReport:
    source: str  # "random", "timm hub", or the file read
    loaded: int = 0  # tensors loaded
    head: str = "new"  # "new" (randomly initialised) or "loaded"


def check_model_name(name: str) -> None:
    """Fail with a did-you-mean when timm has no such architecture."""
    if not timm.is_model(name):
        arch = name.split(".")[0]
        raise ConfigError(
            "model.name",
            f"timm has no model {name!r}{did_you_mean(arch, timm.list_models())}",
        )


def weights_file(path: str | Path, key: str = "model.pretrained") -> Path:
    """The weights file named by ``key`` (``model.pretrained``, a teacher's ``pretrained``): a
    file, or a run directory's weights."""
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            return path / WEIGHTS_FILE
        raise ConfigError(key, f"{path} is a folder without {WEIGHTS_FILE} (not a tlkd run?)")
    if not path.is_file():
        raise ConfigError(key, f"no such weights file or run directory: {path}")
    return path


def build_model(
    cfg: ModelConfig, num_classes: int | None, classes: list[str] | None
) -> tuple[nn.Module, WeightsReport]:
    """Create ``cfg.name`` with a classifier for ``num_classes`` and load its weights."""
    check_model_name(cfg.name)
    kwargs = dict(cfg.kwargs)
    if cfg.drop_rate is not None:
        kwargs["drop_rate"] = cfg.drop_rate
    if cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if num_classes is not None:  # None: the model's own classifier (e.g. a hub teacher)
        kwargs["num_classes"] = num_classes
    local = weights_file(cfg.pretrained) if isinstance(cfg.pretrained, str) else None
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained is True, **kwargs)
    except TypeError as err:  # an unknown keyword in model.kwargs
        raise ConfigError("model.kwargs", f"{cfg.name} does not accept it: {err}") from None
    except RuntimeError as err:
        if "pretrained" in str(err).lower():
            raise ConfigError("model.pretrained", f"{err}") from None
        raise
    except OSError as err:  # huggingface_hub: offline, unreachable or missing file
        raise TlkdError(
            f"model.pretrained: could not get timm's weights for {cfg.name!r} from the "
            f"Hugging Face Hub ({type(err).__name__}). Offline? Set model.pretrained to a local "
            "weights file (.safetensors/.pth) or a tlkd run directory, or to false."
        ) from None
    report = WeightsReport("timm hub" if cfg.pretrained is True else "random")
    if cfg.pretrained is True:
        report.loaded = len(model.state_dict())
    if cfg.head is not None:
        replace_head(model, cfg.head, num_classes)
    if local is not None:
        report = load_weights(model, local, classes)
    return model, report


def load_weights(model: nn.Module, path: Path, classes: list[str] | None = None) -> WeightsReport:
    """Load a state dict (safetensors, or a .pth read with weights_only=True) into ``model``.

    The backbone must match exactly. The classifier is kept when its shapes fit and, for a tlkd
    run directory, its classes are the same as ``classes``; otherwise the new head stays
    randomly initialised (transfer to a new task).
    """
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        raise TlkdError(f"model.pretrained: cannot read weights from {path}: {err}") from None
    head = classifier_name(model)
    run_classes = _run_classes(path)
    same_task = run_classes is None or classes is None or run_classes == classes
    own = model.state_dict()
    is_head = lambda k: k == head or k.startswith(head + ".")  # noqa: E731
    keep, head_loaded = {}, same_task
    for key, value in state.items():
        if is_head(key):
            continue
        if key not in own:
            raise ConfigError(
                "model.pretrained",
                f"{path.name} has {key!r}, which the model lacks (other architecture?)",
            )
        if own[key].shape != value.shape:
            raise ConfigError(
                "model.pretrained",
                f"{path.name}: {key!r} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)} (other architecture or size?)",
            )
        keep[key] = value
    head_state = {k: v for k, v in state.items() if is_head(k)}
    own_head = {k: v for k, v in own.items() if is_head(k)}
    if (
        head_loaded
        and head_state.keys() == own_head.keys()
        and all(head_state[k].shape == own_head[k].shape for k in head_state)
    ):
        keep.update(head_state)
    else:
        head_loaded = False
    missing = [
        k for k in own if k not in keep and not is_head(k) and "num_batches_tracked" not in k
    ]
    if missing:
        raise ConfigError(
            "model.pretrained",
            f"{path.name} lacks {len(missing)} of the model's tensors, e.g. {missing[0]!r} "
            "(other architecture?)",
        )
    model.load_state_dict(keep, strict=False)
    return WeightsReport(str(path), len(keep), "loaded" if head_loaded else "new")


def _run_classes(weights: Path) -> list[str] | None:
    """The classes a tlkd run was trained on, from the summary beside its weights."""
    summary = weights.parent / "summary.json"
    if weights.name != WEIGHTS_FILE or not summary.is_file():
        return None
    try:
        return json.loads(summary.read_text()).get("classes")
    except (OSError, ValueError):
        return None


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights (no shared storage, as safetensors requires)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
