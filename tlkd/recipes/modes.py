"""The training modes: one table, read by the CLI (one command each) and by ``tlkd sweep``
(which runs the mode a config's sections ask for)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI reads MODES at start-up: import nothing heavy here
    from tlkd.config.schema import Config

# mode -> one-line help. Each mode's recipe is the function of the same name in
# tlkd/recipes/<mode>.py: recipe(cfg, *, dry_run, reporter, resume) -> summary | None.
MODES: dict[str, str] = {
    "finetune": "Fine-tune a timm model (transfer learning) as the experiment file says.",
    "distill": "Distil one or more frozen teachers into the student the experiment file names.",
    "adapt": "Adapt a model to an unlabelled target domain (AdaBN, pseudo-labels, DANN, MCC, "
    "CDAN; source-free SHOT and Tent).",
    "pretrain": "Self-supervised pretraining (SimCLR, BYOL, SimSiam) of a backbone on "
    "unlabelled images.",
}


def mode_of(cfg: Config) -> str:
    """The mode a config's sections ask for: an ``adapt:`` block adapts, a ``pretrain:`` block
    pretrains, a teacher (or a ``distill:`` block) distils; anything else fine-tunes."""
    if cfg.adapt is not None:
        return "adapt"
    if cfg.pretrain is not None:
        return "pretrain"
    if cfg.teacher_list or cfg.distill is not None:
        return "distill"
    return "finetune"


def recipe(mode: str) -> Callable[..., dict[str, Any] | None]:
    """The recipe function of ``mode`` (imported on first use: torch and timm are slow)."""
    if mode not in MODES:
        raise KeyError(mode)
    return getattr(importlib.import_module(f"tlkd.recipes.{mode}"), mode)
