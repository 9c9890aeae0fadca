"""Registries of plug-ins (distillation losses, adaptation methods, SSL methods): plain-data
tables, importable without torch, from which the schema builds a section's choices, fields and
defaults. Each entry names the class that implements it ("module:Class"), imported only when a
run builds it, so that a config error costs no torch import."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    impl: str  # "module:Class", imported on use
    about: str  # one line: the method and its reference
    # the entry's own config keys: name -> (pydantic type, default); the schema adds them
    params: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def load(self) -> Any:
        module, name = self.impl.split(":")
        return getattr(importlib.import_module(module), name)


def param_fields(table: Mapping[str, Entry]) -> dict[str, Any]:
    """Every entry's own keys, each once, with its type (the schema makes them optional)."""
    fields: dict[str, Any] = {}
    for name, entry in table.items():
        for key, (kind, _) in entry.params.items():
            if key in fields and fields[key] != kind:
                raise TypeError(f"{name!r}: {key} has another type than in another entry")
            fields[key] = kind
    return fields


def check_name(value: str, table: Mapping[str, Entry], what: str) -> str:
    """``value`` if ``table`` has it, else a ValueError with a did-you-mean."""
    if value not in table:
        from tlkd.config.suggest import did_you_mean

        raise ValueError(
            f"unknown {what} {value!r}{did_you_mean(value, list(table))}; known: {', '.join(table)}"
        )
    return value


def fill_params(section: Any, entry: Entry, keys: Mapping[str, Any], what: str) -> None:
    """Fill ``section``'s unset keys of ``entry`` with its defaults; a key of another entry
    that is set is an error (it would be silently ignored)."""
    for key in keys:
        value = getattr(section, key)
        if key not in entry.params and value is not None:
            raise ValueError(f"{key} does not apply to {what}")
        if value is None and key in entry.params and entry.params[key][1] is not None:
            # the section is still being validated: its frozen fields are set through __dict__
            section.__dict__[key] = entry.params[key][1]
