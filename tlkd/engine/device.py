"""Device and precision policy."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from tlkd.engine import distributed
from tlkd.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device must be available."""
    local_rank = distributed.info().local_rank
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank if distributed.info().enabled else 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda is not available on this machine")
    if device.type == "cuda" and distributed.info().enabled:
        device = torch.device("cuda", local_rank)  # one GPU per process under torchrun
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device", "mps is not available on this machine")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32). ``auto``: bf16 on cuda where supported, else fp16
    on cuda; fp32 elsewhere (on this kind of CPU, bf16 autocast is slower than fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision", "fp16 autocast needs a GPU; use bf16 or fp32 on cpu")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
