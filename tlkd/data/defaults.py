"""Defaults chosen from the data and the run: augmentation, input size and optimizer settings.

A user's first run on their own folder must come close to a careful hand-written loop, so
these defaults are not fixed numbers but rules over what the run knows before training
(the images' size, how many there are, the epochs, pretrained weights, the mode). Each rule
returns its choice and a one-line reason that the plan prints and summary.json records.
Explicitly set keys always win: only keys the user left out are filled.

The augmentation rule (measured in docs/results.md, "Defaults on data they were not tuned on"):

- ``none`` when every training image is seen only a few times (fewer than 5 epochs from
  scratch, 3 from pretrained weights): the model is still underfitting, and random views
  slow fitting more than they regularise (a 4-epoch run on 1,000 28-px images: 70% val
  top-1 with timm's ImageNet recipe, 97% without augmentation).
- ``strong`` (timm's ImageNet recipe: random-resized crop from 8% of the area, flip, colour
  jitter 0.4) for contrastive pretraining, whose views must be strong, and for large photos
  (128 px and up) with many images (10,000+) over a long schedule (30+ epochs): the regime that
  recipe was tuned for.
- ``light`` otherwise: a random crop keeping 70-100% of the image (timm's ``rkrr``) and a
  horizontal flip, the CIFAR-style recipe that helps at any size once a run is long enough
  to overfit, and keeps what a teacher was trained on recognisable for distillation.
Datasets of digits and characters (digits, mnist, kmnist, svhn) are never flipped.

The optimizer rules (learning rate, warm-up, weight decay) are at the end of this module.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tlkd.config.schema import AugmentConfig

POLICIES: dict[str, dict[str, Any]] = {
    # the eval view: resize keeping the aspect ratio, centre crop; nothing random
    "none": dict(
        crop_mode="rkrc", scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0,
        color_jitter=0.0, grayscale=0.0, auto_augment=None, re_prob=0.0,
    ),
    "light": dict(
        crop_mode="rkrr", scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0,
        color_jitter=0.0, grayscale=0.0, auto_augment=None, re_prob=0.0,
    ),
    # timm's create_transform defaults for training (its ImageNet recipe)
    "strong": dict(
        crop_mode="rrc", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0,
        color_jitter=0.4, grayscale=0.0, auto_augment=None, re_prob=0.0,
    ),
}  # fmt: skip
NO_FLIP_DATASETS = {"digits", "mnist", "kmnist", "svhn"}
MIN_IMAGE_SIZE = 32  # ImageNet-stem networks reach 1x1 maps at 32 px; smaller images go up
SHORT_EPOCHS, SHORT_EPOCHS_PRETRAINED = 5, 3
STRONG_MIN_PX, STRONG_MIN_IMAGES, STRONG_MIN_EPOCHS = 128, 10_000, 30


@dataclass(frozen=True)
class RunFacts:
    """What the rules look at."""

    image_px: int | None  # the training images' own (median) size; None if unknown
    train_images: int
    epochs: int
    pretrained: bool  # weights were actually loaded (not a fallback to random)
    mode: str  # finetune, distill, adapt, pretrain
    dataset: str


def choose_policy(facts: RunFacts) -> tuple[str, str]:
    """(policy name, why) for ``data.augment.policy: auto``."""
    if facts.mode == "pretrain":
        return "strong", "contrastive pretraining learns from strongly augmented views"
    short = SHORT_EPOCHS_PRETRAINED if facts.pretrained else SHORT_EPOCHS
    if facts.epochs < short:
        start = "pretrained" if facts.pretrained else "from scratch"
        return "none", (
            f"{facts.epochs} epochs {start} (< {short}): too short for augmentation to pay off"
        )
    if (
        (facts.image_px or 0) >= STRONG_MIN_PX
        and facts.train_images >= STRONG_MIN_IMAGES
        and facts.epochs >= STRONG_MIN_EPOCHS
    ):
        return "strong", (
            f"{facts.image_px}px images, {facts.train_images:,} of them, {facts.epochs} epochs: "
            "timm's ImageNet recipe"
        )
    return "light", (
        f"{facts.epochs} epochs on {facts.train_images:,} images"
        + (f" of {facts.image_px}px" if facts.image_px else "")
    )


def resolve_augment(aug: AugmentConfig, facts: RunFacts) -> tuple[AugmentConfig, str]:
    """The augmentation the run uses: the policy's values for every key the user did not set.
    Returns a new config (the given one is not changed) whose ``policy`` is the concrete name,
    and the reason for the plan."""
    if aug.policy == "auto":
        policy, why = choose_policy(facts)
        why = f"auto: {why}"
    else:
        policy, why = aug.policy, "set by data.augment.policy"
    values = dict(POLICIES[policy])
    if facts.dataset in NO_FLIP_DATASETS and policy != "none":
        values["hflip"] = 0.0
        why += "; no flip for digits/characters"
    explicit = aug.model_fields_set - {"policy"}
    if explicit:
        why += f"; set by you: {', '.join(sorted(explicit))}"
    values.update({k: getattr(aug, k) for k in explicit})
    chosen = AugmentConfig(policy=policy, **values)
    return chosen, f"{why}: {describe(chosen)}"


def describe(aug: AugmentConfig) -> str:
    """The training views in a few words, from the values in effect (after explicit keys)."""
    if aug.scale == (1.0, 1.0) and aug.crop_mode != "rrc":
        parts = ["the whole image"]
    else:
        low, high = (round(100 * v) for v in aug.scale)
        parts = [f"random crop ({low}-{high}% of the image)"]
    if aug.hflip:
        parts.append("flip" if aug.hflip == 0.5 else f"flip (p {aug.hflip:g})")
    if aug.vflip:
        parts.append(f"vertical flip (p {aug.vflip:g})")
    if aug.color_jitter:
        parts.append(f"colour jitter {aug.color_jitter:g}")
    if aug.grayscale:
        parts.append(f"grey (p {aug.grayscale:g})")
    if aug.auto_augment:
        parts.append(aug.auto_augment)
    if aug.re_prob:
        parts.append(f"random erasing (p {aug.re_prob:g})")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def median_size(sizes: Sequence[tuple[int, int]]) -> int | None:
    """The median of the images' shorter sides (the side a resize-and-centre-crop keeps)."""
    return int(statistics.median(min(w, h) for w, h in sizes)) if sizes else None


def sample_sizes(paths: Sequence[str], n: int = 64, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of up to ``n`` of ``paths`` picked at random; read from the file
    headers only (PIL decodes no pixels for ``.size``). Unreadable files are left out."""
    from PIL import Image

    picked = random.Random(seed).sample(list(paths), min(n, len(paths)))
    sizes = []
    for path in picked:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except (OSError, ValueError, SyntaxError):
            continue
    return sizes


def choose_image_size(native: int | None, model_size: int, fixed: bool) -> tuple[int, str]:
    """``data.image_size`` when unset: the images' own size, at least MIN_IMAGE_SIZE, at
    most the model's default input size (models with a fixed input size always get theirs)."""
    if fixed:
        return model_size, f"the model's fixed input size ({model_size}px)"
    if native is None:
        return model_size, f"the model's default input size ({model_size}px)"
    size = min(max(native, MIN_IMAGE_SIZE), model_size)
    if size == native:
        return size, f"the images' own size (median {native}px)"
    if size == model_size:
        return size, f"images of median {native}px, capped at the model's {model_size}px"
    return size, f"images of median {native}px, raised to the minimum {MIN_IMAGE_SIZE}px"


ADAM_LIKE_PREFIXES = ("adam", "nadam", "radam", "lamb", "lion", "adan", "adafactor", "adopt")
BASE_BATCH = 64  # the batch the base learning rates below are for
# Base learning rates at BASE_BATCH, by optimizer family and start. From scratch: AdamW 2e-3
# is the setting the shipped CIFAR and digits configs were tuned to (docs/results.md: on
# 1,000 CIFAR images it gains 4.4 points over 1e-3 with one warm-up epoch); SGD 0.05 is the
# CIFAR references' (RepDistiller train_student.py: lr 0.05 at batch 64). From pretrained
# weights a quarter of that (AdamW 5e-4, SGD 0.01), the usual fine-tuning range, so that the
# first updates of a new head do not wreck the pretrained features.
BASE_LR = {("adam", False): 2e-3, ("adam", True): 5e-4, ("sgd", False): 0.05, ("sgd", True): 0.01}
# Lion's updates are sign()s of unit size: its paper (Chen et al. 2023) advises a learning
# rate 3-10x below AdamW's.
LR_FACTOR = {"lion": 1 / 3}


def base_name(optimizer: str) -> str:
    """timm's name without the variant prefixes that keep the algorithm (``fused``/``bnb``
    implementations, ``c`` for cautious updates: ``cadamw`` -> ``adamw``)."""
    name = optimizer.lower()
    for prefix in ("fused", "bnb"):
        name = name.removeprefix(prefix)
    if name.startswith("c") and name[1:].startswith(ADAM_LIKE_PREFIXES + ("lion", "laprop")):
        name = name[1:]
    return name


def optimizer_family(optimizer: str, adaptive: bool | None = None) -> str:
    """``adam`` for adaptive optimizers (per-parameter step sizes), else ``sgd``. ``adaptive``
    is timm's word for it where known (``get_optimizer_info(name).has_betas``); else the
    name decides."""
    if adaptive is not None:
        return "adam" if adaptive else "sgd"
    return "adam" if base_name(optimizer).startswith(ADAM_LIKE_PREFIXES) else "sgd"


def default_lr(
    optimizer: str, pretrained: bool, batch: int, adaptive: bool | None = None
) -> tuple[float, str]:
    """``train.optimizer.lr`` when unset: a base rate by optimizer family and start (from
    scratch or pretrained weights), scaled from batch 64 to the run's batch (after gradient
    accumulation) as timm's train.py scales ``--lr-base``: by the square root for adaptive
    optimizers, linearly for SGD-like ones."""
    name = optimizer.lower()
    family = optimizer_family(name, adaptive)
    base = BASE_LR[(family, pretrained)] * LR_FACTOR.get(base_name(name), 1.0)
    power = 0.5 if family == "adam" else 1.0
    lr = float(f"{base * (batch / BASE_BATCH) ** power:.3g}")
    start = "pretrained weights" if pretrained else "random weights"
    scaled = (
        f", {'sqrt' if power == 0.5 else 'linearly'} scaled to batch {batch}"
        if batch != BASE_BATCH
        else ""
    )
    return lr, f"{name} from {start}: {base:g} at batch {BASE_BATCH}{scaled}"


def default_warmup(epochs: int) -> tuple[int, str]:
    """``train.scheduler.warmup_epochs`` when unset: none for runs under 3 epochs, else about
    5% of the epochs, at least 1 and at most 5 (timm's train.py warms up for 5)."""
    if epochs < 3:
        return 0, f"{epochs} epochs: too short to spend one warming up"
    warm = min(5, max(1, round(epochs / 20)))
    return warm, f"about 5% of {epochs} epochs, 1 to 5"


def default_weight_decay(optimizer: str) -> tuple[float, str]:
    """Weight decay when ``train.optimizer.weight_decay`` is unset, by optimizer family.

    Adam-family optimizers in timm (adamw, lamb, lion, ...) apply decoupled decay, where the
    usual value is 0.05 (timm's and DeiT's recipes); for SGD-like optimizers decay is an L2
    term added to the gradient, where 5e-4 is the usual value (ResNet on CIFAR, and the value
    torchvision's and RepDistiller's CIFAR recipes use). Plain ``adam`` couples decay to the
    gradient too, so it gets the SGD-like value."""
    name = base_name(optimizer)
    if name.startswith(ADAM_LIKE_PREFIXES) and name not in ("adam", "nadam", "radam", "adopt"):
        return 0.05, f"{name}: decoupled (Adam-like) decay"
    return 5e-4, f"{name}: decay added to the gradient (SGD-like)"
