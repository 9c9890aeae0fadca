"""The distillation-loss registry: one entry per loss type, what it needs and what it takes.

The table is plain data (tlkd/config/registry.py), so the config schema builds
``distill.losses``' fields, choices and defaults from it; each entry names the class that
implements the loss, imported when a run builds it. As torchdistill registers its losses by
name, adding a loss is one file under ``tlkd/distill/losses/`` (an ``nn.Module`` built from
the loss's config) and one entry here; the objective has no per-type code.

A term gets, by ``inputs``:

- ``labels``: ``term(student_logits, targets)``, labelled rows only;
- ``logits``: ``term(student_logits, teacher_logits, targets)``, the teacher's logits for the
  student's classes (several teachers: their ensemble at the term's ``temperature``, see
  tlkd/distill/losses/ensemble.py); ``targets`` is given when the entry ``needs_labels``;
- ``features``: ``term(student_maps, teacher_maps)``, paired lists of features of the
  chosen ``student_layers`` / ``teacher_layers``; ``term.build(student_shapes, teacher_shapes)``
  first, once, for trainable parts (regressors), which then train with the student. Which
  layers by default is the entry's ``layers`` (see tlkd/distill/features.py): ``stages`` the
  last three feature stages, ``hint`` FitNet's one hint stage, ``last`` the last stage's map,
  ``embedding`` the pooled features the classifier reads (layer name ``pre_logits``),
  ``review`` the last three stages and ``pre_logits``.

A term's ``weight`` defaults to its reference's: RepDistiller's ``-b`` of the same method
(fitnet 100, at 1000, sp 3000, pkt 30000, crd 0.8; its README and
scripts/run_cifar_distill.sh), 1 elsewhere (mdistiller's DKD and ReviewKD weights, DIST's
and RKD's inner weights).

A term whose config has ``warmup_epochs`` is ramped by the objective, ``x min(epoch / n, 1)``.
A logit term whose config has ``standardize`` true (logit standardization, Sun et al. 2024)
gets z-scored logits: the student's, and each teacher's before the ensemble (the objective
does it, the term does not); ``temperature`` is then the base temperature, and the unset keys
take the authors' settings (sunshangquan/logit-standardization-KD, README and tools/train.py:
base temperature 2, KD weight 9, which multiplies DKD's alpha and beta).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat

from tlkd.config.registry import Entry


@dataclass(frozen=True)
class LossEntry(Entry):
    inputs: Literal["labels", "logits", "features"] = "logits"
    needs_labels: bool = False  # a logit loss that also reads the ground truth (dkd)
    head: Literal["class", "dist"] = "class"  # logits: "dist", a DeiT student's distillation head
    layers: Literal["stages", "hint", "last", "embedding", "review"] = "stages"  # the default
    # the term's weight when the config gives none: the reference's (RepDistiller's ``-b``)
    weight: float = 1.0
    # defaults that replace the entry's when ``standardize: true`` (the authors' settings)
    standardized: dict[str, float] | None = None


Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]

LOSSES: dict[str, LossEntry] = {
    "ce": LossEntry(
        "tlkd.distill.losses.ce:CE", "cross-entropy on the labels",
        {"label_smoothing": (Fraction, 0.0)}, inputs="labels",
    ),
    "kd": LossEntry(
        "tlkd.distill.losses.kd:KD", "softmax distillation (Hinton et al. 2015)",
        {"temperature": (PositiveFloat, 4.0), "standardize": (bool, False)},
        standardized={"temperature": 2.0, "weight": 9.0},
    ),
    "hard": LossEntry(
        "tlkd.distill.losses.hard:Hard", "cross-entropy on the teacher's top class",
    ),
    "dkd": LossEntry(
        "tlkd.distill.losses.dkd:DKD", "decoupled KD (Zhao et al. 2022, mdistiller)",
        {
            "temperature": (PositiveFloat, 4.0),
            "alpha": (NonNegativeFloat, 1.0),
            "beta": (NonNegativeFloat, 8.0),
            "warmup_epochs": (NonNegativeInt, 20),  # mdistiller's linear ramp; 0: none
            "standardize": (bool, False),  # logit standardization (Sun et al. 2024)
        },
        needs_labels=True,
        standardized={"temperature": 2.0, "alpha": 9.0, "beta": 72.0},  # x9: the KD weight
    ),
    "dist": LossEntry(
        "tlkd.distill.losses.dist:DIST", "DIST (Huang et al. 2022)",
        {
            "temperature": (PositiveFloat, 1.0),
            "beta": (NonNegativeFloat, 1.0),
            "gamma": (NonNegativeFloat, 1.0),
            "standardize": (bool, False),
        },
    ),
    "token": LossEntry(
        "tlkd.distill.losses.token:Token",
        "DeiT distillation token (Touvron et al. 2021, facebookresearch/deit)",
        {"mode": (Literal["hard", "soft"], "hard"), "temperature": (PositiveFloat, 1.0)},
        head="dist",
    ),
    "fitnet": LossEntry(
        "tlkd.distill.losses.fitnet:FitNet",
        "FitNet hints (Romero et al. 2015, RepDistiller ConvReg)", inputs="features",
        layers="hint", weight=100.0,
    ),
    "at": LossEntry(
        "tlkd.distill.losses.at:AT", "attention transfer (Zagoruyko & Komodakis 2017)",
        {"p": (PositiveFloat, 2.0)}, inputs="features", weight=1000.0,
    ),
    "reviewkd": LossEntry(
        "tlkd.distill.losses.reviewkd:ReviewKD",
        "knowledge review, ABF + HCL (Chen et al. 2021, mdistiller)",
        {
            "max_mid_channel": (Annotated[int, Field(ge=1)], 512),  # mdistiller MAX_MID_CHANNEL
            "warmup_epochs": (NonNegativeInt, 20),  # mdistiller's linear ramp; 0: none
        },
        inputs="features", layers="review",
    ),
    "rkd": LossEntry(
        "tlkd.distill.losses.rkd:RKD", "relational KD, distance and angle (Park et al. 2019)",
        {
            "distance_weight": (NonNegativeFloat, 25.0),  # RepDistiller RKDLoss w_d
            "angle_weight": (NonNegativeFloat, 50.0),  # RepDistiller RKDLoss w_a
        },
        inputs="features", layers="embedding",
    ),
    "pkt": LossEntry(
        "tlkd.distill.losses.pkt:PKT", "probabilistic knowledge transfer (Passalis & Tefas 2018)",
        inputs="features", layers="embedding", weight=30000.0,
    ),
    "sp": LossEntry(
        "tlkd.distill.losses.sp:SP", "similarity-preserving KD (Tung & Mori 2019)",
        inputs="features", layers="last", weight=3000.0,
    ),
    "crd": LossEntry(
        "tlkd.distill.losses.crd:CRD",
        "contrastive representation distillation (Tian et al. 2020, RepDistiller)",
        {  # RepDistiller train_student.py defaults
            "feat_dim": (Annotated[int, Field(ge=1)], 128),
            "nce_k": (Annotated[int, Field(ge=1)], 16384),
            "nce_t": (PositiveFloat, 0.07),
            "nce_m": (Fraction, 0.5),  # memory momentum
        },
        inputs="features", layers="embedding", weight=0.8,
    ),
}  # fmt: skip
