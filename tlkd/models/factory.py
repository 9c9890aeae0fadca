"""Build a model from the timm registry with its weights and a head for the data's classes."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models import load_state_dict
from torch import nn

from tlkd.config.schema import ModelConfig
from tlkd.config.suggest import did_you_mean
from tlkd.errors import ConfigError, TlkdError
from tlkd.models.head import classifier_names, is_head_key, replace_head
from tlkd.models.lora import has_lora, merged_state_dict

WEIGHTS_FILE = "model.safetensors"


HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class WeightsReport:
    source: str  # "random", "timm hub", or the file read
    loaded: int = 0  # tensors loaded
    head: str = "new"  # "new" (randomly initialised) or "loaded"
    warning: str | None = None  # pretrained: auto fell back to random weights (and why)


@cache
def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` seconds
    (False when HF_HUB_OFFLINE is set). huggingface_hub itself retries for about 50 s before
    giving up offline; this probe bounds that, name resolution included (it runs in a thread,
    since getaddrinfo takes no timeout). Asked once per process."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    url = urlparse(hub.ENDPOINT)
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(ok)


@contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode while loading: cached weights load, missing ones fail at
    once instead of after retries. huggingface_hub reads the flag on every call."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def has_hub_weights(name: str) -> bool:
    """Whether timm knows where pretrained weights of ``name`` live."""
    from timm.models import get_pretrained_cfg

    try:
        pcfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return False
    return bool(pcfg and (pcfg.hf_hub_id or pcfg.url or pcfg.file))


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
    hub = cfg.pretrained is True or cfg.pretrained == "auto"
    local = weights_file(cfg.pretrained) if isinstance(cfg.pretrained, str) and not hub else None
    report = WeightsReport("random")
    if cfg.pretrained == "auto" and not has_hub_weights(cfg.name):
        hub = False
        report.source = "random (auto: timm has no pretrained weights for this model)"
    model = None
    if hub:
        rng = torch.get_rng_state()
        online = hub_reachable()
        try:
            with hub_offline(not online):
                model = _create(cfg.name, True, kwargs)
            report = WeightsReport("timm hub", len(model.state_dict()))
        except OSError as err:  # huggingface_hub: offline, unreachable or missing file
            where = (
                "not cached and the Hub is unreachable (offline?)"
                if not online
                else f"unavailable ({type(err).__name__})"
            )
            if cfg.pretrained is True:
                raise TlkdError(
                    f"model.pretrained: could not get timm's weights for {cfg.name!r} from the "
                    f"Hugging Face Hub ({where}). Set model.pretrained to a local weights file "
                    "(.safetensors/.pth) or a tlkd run directory, or to false."
                ) from None
            torch.set_rng_state(rng)  # the same random start as pretrained: false
            report.source = "random (auto: hub weights unavailable)"
            report.warning = (
                f"no pretrained weights: timm's weights for {cfg.name!r} are {where}; training "
                "from random weights (model.pretrained: true insists, false silences this)"
            )
    if model is None:
        model = _create(cfg.name, False, kwargs)
    if cfg.head is not None:
        replace_head(model, cfg.head, num_classes)
    if local is not None:
        report = load_weights(model, local, classes)
    return model, report


def _create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:  # an unknown keyword in model.kwargs
        raise ConfigError("model.kwargs", f"{name} does not accept it: {err}") from None
    except RuntimeError as err:
        if "pretrained" in str(err).lower():
            raise ConfigError("model.pretrained", f"{err}") from None
        raise


def load_weights(
    model: nn.Module,
    path: Path,
    classes: list[str] | None = None,
    key: str = "model.pretrained",
) -> WeightsReport:
    """Load a state dict (safetensors, or a .pth read with weights_only=True) into ``model``.

    The backbone must match exactly. The classifier is kept when its shapes fit and, for a tlkd
    run directory, its classes are the same as ``classes``; otherwise the new head stays
    randomly initialised (transfer to a new task).
    """
    state = read_state_dict(path, key)
    heads = classifier_names(model)
    run_classes = _run_classes(path)
    same_task = run_classes is None or classes is None or run_classes == classes
    own = model.state_dict()
    is_head = lambda k: is_head_key(k, heads)  # noqa: E731
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


def read_state_dict(path: Path, key: str = "model.pretrained") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or PyTorch file (``weights_only=True``). A file of another
    kind (text, JSON, an image, a zip archive, ...) is a ConfigError naming what it is; a
    weights file that cannot be read (truncated, corrupt) is a TlkdError."""
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported the same way
        found = sniff_format(path)
        if found is not None:
            raise ConfigError(
                key,
                f"cannot read weights from {path}: not a safetensors or PyTorch weights file "
                f"(found {found})",
            ) from None
        raise TlkdError(f"{key}: cannot read weights from {path}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            key, f"cannot read weights from {path}: it holds no state dict of tensors"
        )
    return state


def sniff_format(path: Path) -> str | None:
    """What a file that failed to load as weights is, from its first bytes; None when it looks
    like weights (safetensors, a PyTorch zip or pickle), only damaged."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as err:
        return f"an unreadable file ({err.strerror})"
    if not head:
        return "an empty file"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return None  # safetensors: an 8-byte header length, then a JSON header
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return None  # a pickle: PyTorch's legacy format
    if head.startswith(b"PK\x03\x04"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (OSError, zipfile.BadZipFile):
            return None  # a truncated zip: most likely a damaged PyTorch file
        return None if any(n.endswith("data.pkl") for n in names) else "a zip archive"
    for magic, kind in (
        (b"\x1f\x8b", "gzip data"),
        (b"\x89PNG", "a PNG image"),
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"\x89HDF", "an HDF5 file (Keras?)"),
        (b"\x93NUMPY", "a NumPy array file"),
        (b"%PDF", "a PDF document"),
    ):
        if head.startswith(magic):
            return kind
    if b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = None
            if len(head) < 4096:
                return "binary data of an unknown kind"
        if text is not None:
            stripped = text.lstrip()
            if stripped[:1] in ("{", "["):
                return "JSON text"
            if stripped.startswith("<"):
                return "HTML or XML text (a download error page?)"
            return "text"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "a tar archive"
    return "binary data of an unknown kind"


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
    """A CPU copy of the weights (no shared storage, as safetensors requires); with LoRA
    adapters (model.lora), merged into their layers under timm's names."""
    if has_lora(model):
        return merged_state_dict(model)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
