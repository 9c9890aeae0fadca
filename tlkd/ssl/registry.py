"""The self-supervised method registry (``pretrain.method``): plain data, read by the schema
for the method's keys and defaults (tlkd/config/registry.py). Adding a method is one file with
its objective (built as ``Method(feature_width, cfg)``, with a ``plan_line(cfg, features)``
class method; it learns from batches of two views, [views 1; views 2]) and one entry here."""

from __future__ import annotations

from pydantic import PositiveFloat, PositiveInt

from tlkd.config.registry import Entry

METHODS: dict[str, Entry] = {
    "simclr": Entry(
        "tlkd.ssl.simclr:SimCLR",
        "SimCLR (Chen et al. 2020): NT-Xent as SimCLR's code, both directions summed, "
        "negatives gathered from every process under torchrun",
        {
            "temperature": (PositiveFloat, 0.2),
            "proj_dim": (PositiveInt, 128),  # projection head output
            "proj_hidden": (PositiveInt, 512),
        },
    ),
}
