"""Load an experiment: YAML (safe_load only) -> `base:` inheritance -> CLI overrides -> schema.

Every failure becomes one :class:`ConfigError` line naming the key; nothing here imports or
calls code named by a config.
"""

from __future__ import annotations

import copy
import functools
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tlkd.config import safe_yaml
from tlkd.config.schema import Config
from tlkd.config.suggest import did_you_mean, did_you_mean_path
from tlkd.errors import ConfigError

MAX_BASE_DEPTH = 16


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (or start from defaults when None), apply ``key.path=value`` overrides,
    validate against the schema and return the config with paths made absolute."""
    raw = read_yaml(Path(path)) if path is not None else {}
    if overrides and isinstance(raw.get("resolved"), dict):
        # a saved run's config with changes: what tlkd chose for the old inputs is chosen
        # again for the new ones (a resume keeps its run's choices, see build_experiment)
        del raw["resolved"]
    for text in overrides:
        apply_override(raw, text)
    return validate(raw)


def validate(raw: dict[str, Any]) -> Config:
    """Validate a plain dict against the schema; paths come back absolute."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise _to_config_error(err) from None
    return _absolute_paths(cfg)


def resolved_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML-able data, every default filled in, except the augmentation
    keys left to ``data.augment.policy``: written out, they would read back as set by the
    user and override the policy."""
    data = cfg.model_dump(mode="json")
    aug = cfg.data.augment
    data["data"]["augment"] = {
        "policy": aug.policy,
        **aug.model_dump(mode="json", exclude_unset=True, exclude={"policy"}),
    }
    return data


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys (``{"train.optimizer.lr": 0.01}``);
    lists are values."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): data}


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A new config: ``cfg`` with the dotted keys of ``values`` set (``data.image_size``,
    ``distill.losses.0.student_layers``; a section may be given whole), validated again. The
    keys the user set stay set and the others keep their defaults, so rules that look at what
    was set explicitly (the augmentation policy) see the same. ``cfg`` is not changed."""
    if not values:
        return cfg
    raw = cfg.model_dump(exclude_unset=True)
    for key, value in values.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        _set_path(raw, key.split("."), value, key)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise _to_config_error(err) from None


def effective(cfg: Config) -> Config:
    """``cfg`` with its ``resolved`` values applied: what a saved run actually used."""
    return with_values(cfg, cfg.resolved) if cfg.resolved else cfg


def _set_path(node: Any, parts: list[str], value: Any, key: str) -> None:
    """Set ``value`` at the dotted ``parts`` of plain data (numeric parts index into lists;
    missing or null sections are created)."""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(where, f"no item {part} in a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            prefix = ".".join(parts[:i])
            raise ConfigError(key, f"{prefix} is a value ({node!r}), not a section")


def read_yaml(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one experiment file and merge it over the file its ``base:`` key names."""
    path = path.expanduser().resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError("base", f"configs extend each other in a cycle: {cycle}")
    if len(_chain) >= MAX_BASE_DEPTH:
        raise ConfigError("base", f"more than {MAX_BASE_DEPTH} levels of base: configs")
    if not path.is_file():
        where = f" (named by base: in {_chain[-1]})" if _chain else ""
        raise ConfigError(None, f"config file not found: {path}{where}")
    try:
        data = safe_yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(None, f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(None, f"{path}: not a UTF-8 text file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(None, f"{path}: expected a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError("base", f"expected a path to another config file, got {base!r}")
    parent = read_yaml(path.parent / base, (*_chain, path))
    return deep_merge(parent, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value (lists included) replaces the base's."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(raw: dict[str, Any], text: str) -> None:
    """Apply one ``key.path=value`` override in place; the value is parsed as YAML and typed
    later by the schema. Numeric parts index into lists (``distill.losses.0.weight=1``)."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(None, f"override {text!r} is not of the form key.path=value")
    try:
        value = safe_yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text
    _set_path(raw, key.split("."), value, key)


def _absolute_paths(cfg: Config) -> Config:
    """Relative paths are relative to the working directory; store them absolute so the saved
    config reruns from anywhere."""
    values: dict[str, Any] = {"output_dir": cfg.output_dir.expanduser().resolve()}
    data = cfg.data
    for key in ("root", "train", "val", "unlabeled", "cache_dir"):
        if getattr(data, key) is not None:
            values[f"data.{key}"] = getattr(data, key).expanduser().resolve()
    if cfg.adapt is not None and cfg.adapt.source_val is not None:
        values["adapt.source_val"] = cfg.adapt.source_val.expanduser().resolve()
    if isinstance(cfg.model.pretrained, str) and cfg.model.pretrained != "auto":
        values["model.pretrained"] = _absolute(cfg.model.pretrained)
    for i, teacher in enumerate(cfg.teacher_list):
        if isinstance(teacher.pretrained, str):  # true/false stay booleans
            key = f"teachers.{i}" if cfg.teachers is not None else "teacher"
            values[f"{key}.pretrained"] = _absolute(teacher.pretrained)
    changed = {k: v for k, v in values.items() if _get(cfg, k) != v}
    return with_values(cfg, changed)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, list) else getattr(cfg, part)
    return cfg


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _to_config_error(err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    if first["type"] == "extra_forbidden":  # the last part is the user's key, whatever it holds
        *parent, name = first["loc"]
        parent = [p for p in parent if not _is_union_tag(p)]
        key = ".".join(str(p) for p in [*parent, name])
        hint = _unknown_key_hint(parent, str(name))
        if not key.isprintable():  # one line, whatever the key holds (a newline, ...)
            key = key.encode("unicode_escape").decode("ascii")
        return ConfigError(None, f"unknown key '{key}'{hint}")
    loc = [p for p in first["loc"] if not _is_union_tag(p)]
    key = ".".join(str(p) for p in loc)
    if first["type"] == "missing":
        return ConfigError(key or None, "required key is missing")
    msg = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if first["type"] == "model_type":
        msg = "expected a section (a mapping of keys)"
    value = first.get("input")
    if first["type"] not in ("value_error", "assertion_error") and not isinstance(value, dict):
        shown = repr(value)
        msg = f"{msg} (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    return ConfigError(key or None, msg[0].lower() + msg[1:] if msg else msg)


def _is_union_tag(part: Any) -> bool:
    # pydantic puts the tried union member in the error location ("int", "list[...]", ...)
    return isinstance(part, str) and (
        part in {"bool", "int", "float", "str", "none"}
        or "[" in part
        or part.startswith("function")
    )


def _fields_at(loc: list[Any]) -> list[str]:
    """Names of the keys allowed in the section at ``loc``, for did-you-mean."""
    model: type[BaseModel] | None = Config
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _unknown_key_hint(parent: list[Any], name: str) -> str:
    """Did-you-mean for an unknown key: the same key one level further down its own section
    (``train.warmup_epochs`` -> ``train.scheduler.warmup_epochs``), else the closest sibling
    (``train.epoch`` -> ``epochs``), else the closest key anywhere (``train.lr`` ->
    ``train.optimizer.lr``)."""
    section = ".".join(str(p) for p in parent if not isinstance(p, int))
    dotted = f"{section}.{name}" if section else name
    below = [p for p in schema_paths() if p.startswith(f"{section}.")] if section else []
    return (
        did_you_mean_path(dotted, below, exact=True)
        or did_you_mean(name, _fields_at(parent))
        or did_you_mean_path(dotted, schema_paths())
    )


@functools.cache
def schema_paths() -> tuple[str, ...]:
    """Every dotted key path of the schema (``train.optimizer.lr``; items of a list of
    sections as ``N``: ``teachers.N.pretrained``), sections included."""
    out: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            out.append(path)
            sub = _model_in(field.annotation)
            if sub is not None:
                walk(sub, f"{path}.N." if _is_list_of_sections(field.annotation) else f"{path}.")

    walk(Config, "")
    return tuple(out)


def _is_list_of_sections(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_is_list_of_sections(arg) for arg in typing.get_args(annotation))
    return False


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
