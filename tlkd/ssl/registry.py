"""The self-supervised method registry (``pretrain.method``): plain data, read by the schema
for the method's keys and defaults (tlkd/config/registry.py). Adding a method is one file with
its objective (built as ``Method(feature_width, cfg)``, with a ``plan_line(cfg, features)``
class method; it learns from batches of two views, [views 1; views 2]) and one entry here.
What a method needs from the loop goes through the generic hooks of ``Objective``
(tlkd/engine/objectives.py): ``attach`` (BYOL's target network), ``after_update`` (its EMA),
``param_groups`` (SimSiam's predictor with a fixed lr)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveFloat, PositiveInt

from tlkd.config.registry import Entry

# BYOL's base EMA rate of the target network (raised to 1 by a cosine over the run)
Rate = Annotated[float, Field(ge=0.0, le=1.0)]

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
    "byol": Entry(
        "tlkd.ssl.byol:BYOL",
        "BYOL (Grill et al. 2020): an online network predicts an EMA target network's "
        "projection of the other view, 2 - 2 cos both ways (deepmind-research byol/)",
        {
            # lightly's CIFAR-10 benchmark sizes; the paper's ImageNet heads: 4096 hidden
            "proj_hidden": (PositiveInt, 1024),
            "proj_dim": (PositiveInt, 256),
            "pred_hidden": (PositiveInt, 1024),
            # the official code's preset for 100-300 epochs (40: 0.97; 1000, the paper: 0.996)
            "tau_base": (Rate, 0.99),
        },
    ),
    "simsiam": Entry(
        "tlkd.ssl.simsiam:SimSiam",
        "SimSiam (Chen & He 2021): a predictor on one view's projection matches the other's, "
        "stop-gradient on it, -cos both ways (facebookresearch/simsiam)",
        {
            # the paper's CIFAR variant (2 projection layers; ImageNet: 3)
            "proj_layers": (Annotated[int, Field(ge=2, le=3)], 2),
            "proj_hidden": (PositiveInt, 2048),
            "proj_dim": (PositiveInt, 2048),
            "pred_hidden": (PositiveInt, 512),  # the predictor's bottleneck
            # main_simsiam.py --fix-pred-lr: the predictor's lr is not scheduled
            "fix_pred_lr": (bool, False),
        },
    ),
}
