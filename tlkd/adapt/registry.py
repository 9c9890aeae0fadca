"""The adaptation-method registry (``adapt.method``): plain data, read by the schema for the
method's keys and defaults (tlkd/config/registry.py). Adding a method is one file with its
objective (a ``DomainObjective``, tlkd/adapt/objectives.py) and one entry here; the objective
class says how the run is wired (``trains_on_target``, ``uses_target_stats``, its plan lines
and summary fields), so the adapt recipe has no per-method code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from tlkd.config.registry import Entry


@dataclass(frozen=True)
class MethodEntry(Entry):
    # adapts without training (train.epochs: 0 allowed): e.g. BatchNorm statistics only
    without_training: bool = False
    # source-free: adapts a trained source model (model.pretrained: a run directory or weights
    # file, its classifier loaded) on target images alone; data.train is not read (an error)
    source_free: bool = False
    # the reference's optimizer (train.optimizer keys) when the config names none, and where
    # it comes from (for the plan)
    optimizer: dict[str, Any] | None = None
    optimizer_source: str = ""


Probability = Annotated[float, Field(gt=0.0, le=1.0)]
# source-only epochs before the target term starts
WARMUP = (NonNegativeInt, 0)
# false (the papers' method, e.g. plain DANN): source and target images share one batch and
# its BatchNorm statistics; true: the per-domain-BN variant (BatchNorm per domain in training,
# re-estimated on the target before validation)
TARGET_BN = (bool, False)

METHODS: dict[str, MethodEntry] = {
    "adabn": MethodEntry(
        "tlkd.adapt.objectives:AdaBN",
        "AdaBN (Li et al. 2016): BatchNorm statistics re-estimated on the target",
        without_training=True,
    ),
    "pseudo_label": MethodEntry(
        "tlkd.adapt.objectives:PseudoLabel",
        "self-training on confident target predictions (Lee 2013)",
        {"threshold": (Probability, 0.95), "warmup_epochs": WARMUP, "target_bn": TARGET_BN},
    ),
    "dann": MethodEntry(
        "tlkd.adapt.objectives:DANN",
        "domain-adversarial training (Ganin & Lempitsky 2015)",
        {"hidden": (PositiveInt, 256), "warmup_epochs": WARMUP, "target_bn": TARGET_BN},
    ),
    "mcc": MethodEntry(
        "tlkd.adapt.mcc:MCC",
        "minimum class confusion on the target predictions (Jin et al. 2020)",
        {"temperature": (PositiveFloat, 2.5), "warmup_epochs": WARMUP, "target_bn": TARGET_BN},
    ),
    "cdan": MethodEntry(
        "tlkd.adapt.cdan:CDAN",
        "conditional domain-adversarial training; entropy: true is CDAN+E (Long et al. 2018)",
        {
            # tllib's CDAN example: a 1024-unit discriminator (its input is features x classes)
            "hidden": (PositiveInt, 1024),
            "entropy": (bool, False),  # CDAN+E: rows weighted by 1 + exp(-entropy)
            # the randomized multilinear map; auto: when features x classes > 4096 (the paper)
            "randomized": (bool | Literal["auto"], "auto"),
            "randomized_dim": (PositiveInt, 1024),
            "warmup_epochs": WARMUP,
            "target_bn": TARGET_BN,
        },
    ),
    "shot": MethodEntry(
        "tlkd.adapt.shot:SHOT",
        "source-free: information maximisation and clustered pseudo-labels with the source "
        "classifier frozen (Liang et al. 2020)",
        {
            "pseudo_weight": (NonNegativeFloat, 0.3),  # SHOT's cls_par; 0: SHOT-IM
            "diversity": (bool, True),  # SHOT's gent: minus the entropy of the mean prediction
            "distance": (Literal["cosine", "euclidean"], "cosine"),  # of the clustering
            # SHOT's threshold: a class keeps its centroid with more than this many images
            "cluster_threshold": (NonNegativeInt, 0),
        },
        source_free=True,
        # every layer at lr 0.01, Nesterov momentum 0.9, weight decay 1e-3 (timm's sgd is
        # Nesterov); SHOT's (1 + 10 p)^-0.75 decay is not a timm scheduler: the run's is used
        optimizer={"name": "sgd", "lr": 0.01, "weight_decay": 1e-3},
        optimizer_source="SHOT's target stage, tim-learn/SHOT digit/uda_digit.py",
    ),
    "tent": MethodEntry(
        "tlkd.adapt.tent:Tent",
        "source-free test-time entropy minimisation of BatchNorm's scale and shift (Wang et "
        "al. 2021)",
        # true: adapt on the data.val stream while predicting it (one update per batch)
        {"online": (bool, False)},
        source_free=True,
        optimizer={"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
        optimizer_source="Tent's CIFAR-10-C setting, DequanWang/tent cfgs/tent.yaml",
    ),
}
