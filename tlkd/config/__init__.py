"""Experiment configs: the typed schema, YAML loading with `base:` and overrides."""

from tlkd.config.loader import load_config, resolved_dict
from tlkd.config.schema import Config

__all__ = ["Config", "load_config", "resolved_dict"]
