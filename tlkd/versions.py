"""Versions of tlkd and its main dependencies, read from the installed packages' metadata
(so that ``tlkd version`` imports neither torch nor timm)."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import tlkd

PACKAGES = ("torch", "torchvision", "timm")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        if name in sys.modules:  # loaded already: its own string has the build (+cu130)
            out[name] = sys.modules[name].__version__
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["tlkd"] = tlkd.__version__
    return out
