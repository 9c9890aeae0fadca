"""Conditional domain-adversarial training (Long et al., "Conditional Adversarial Domain
Adaptation", NeurIPS 2018): CDAN, and with ``adapt.entropy`` CDAN+E. The discriminator
reads the features conditioned on the classifier's predictions (their multilinear map),
through gradient reversal. The conventions (the maps, entropy weights, reductions, the
reversal's warm start, a BatchNorm discriminator) are those of
thuml/Transfer-Learning-Library (tllib/alignment/cdan.py, tllib/modules/grl.py,
tllib/modules/domain_discriminator.py and its CDAN example)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.adapt.grl import DomainDiscriminator, dann_lambda
from tlkd.adapt.objectives import DANN, certainty_weights
from tlkd.config.schema import AdaptConfig

# the CDAN paper's rule: the full multilinear map up to this many outputs (features x
# classes), the randomized one above it
MULTILINEAR_MAX = 4096
# tllib's WarmStartGradientReverseLayer as its CDAN loss builds it: lambda rises from lo 0
# towards hi 1 as 2 / (1 + exp(-alpha i / max_iters)) - 1, i counted from 0 per step
GRL_ALPHA, GRL_MAX_ITERS = 1.0, 1000


class MultilinearMap(nn.Module):
    """(features f, probabilities g) -> their outer product g f^T flattened per row:
    entry ``c * F + j`` is ``g_c f_j``."""

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (g[:, :, None] * f[:, None, :]).flatten(1)


class RandomizedMultilinearMap(nn.Module):
    """``(f R_f) * (g R_g) / sqrt(dim)``, an unbiased estimate of the multilinear map's inner
    products in ``dim`` dimensions. R_f, R_g are standard normal, drawn once (R_f first) and
    kept as buffers, so a checkpoint carries them. In float32 (float64 stays), also under
    autocast, as the full map's products are."""

    def __init__(self, features: int, classes: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("rf", torch.randn(features, dim))
        self.register_buffer("rg", torch.randn(classes, dim))

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(torch.promote_types(f.dtype, g.dtype), torch.float32)
        with torch.autocast(f.device.type, enabled=False):
            rf, rg = self.rf.to(dtype), self.rg.to(dtype)
            return (f.to(dtype) @ rf) * (g.to(dtype) @ rg) / math.sqrt(self.dim)


def randomized_map(setting: bool | str, features: int, classes: int) -> bool:
    """Whether the randomized map is used: ``auto`` when features x classes exceeds
    ``MULTILINEAR_MAX``."""
    if setting == "auto":
        return features * classes > MULTILINEAR_MAX
    return bool(setting)


def cdan_loss(
    discriminator: DomainDiscriminator,
    mapping: nn.Module,
    feats: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lam: float,
    entropy: bool,
) -> torch.Tensor:
    """The discriminator's binary cross-entropy on the map of (features, softmax of the
    logits without gradient), through gradient reversal with ``lam``: source rows labelled
    0, ``target`` rows 1 (tllib labels the source 1; the same loss by symmetry), the mean
    over all rows. With ``entropy`` (CDAN+E) each row counts ``certainty_weights`` times."""
    probs = F.softmax(logits, dim=1).detach()
    d = discriminator(mapping(feats, probs), lam)
    per_row = F.binary_cross_entropy_with_logits(d, target.to(d.dtype), reduction="none")
    if entropy:
        per_row = per_row * certainty_weights(probs)
    return per_row.mean()


class CDAN(DANN):
    """Source cross-entropy plus ``adapt.weight`` x the conditional domain loss (after
    ``warmup_epochs``). The discriminator (``hidden`` units, BatchNorm, as tllib's) reads the
    multilinear map of the classifier's input features and its softmax output, randomized to
    ``randomized_dim`` dimensions when ``randomized`` says so (``auto``: above 4096). The
    reversal's lambda follows tllib's warm start (alpha 1, 1000 iterations) per adapting
    step. The discriminator and the random matrices are checkpointed with the model but not
    saved in model.safetensors."""

    title: ClassVar[str] = "CDAN"

    def make_discriminator(self, features: int, model: nn.Module) -> nn.Module:
        classes = getattr(model, "num_classes", None) or _classes(model)
        cfg = self.cfg
        if randomized_map(cfg.randomized, features, classes):
            self.mapping: nn.Module = RandomizedMultilinearMap(
                features, classes, cfg.randomized_dim
            )
            width = cfg.randomized_dim
        else:
            self.mapping = MultilinearMap()
            width = features * classes
        return DomainDiscriminator(width, cfg.hidden, batch_norm=True)

    @classmethod
    def plan_lines(cls, cfg: AdaptConfig, epochs: int) -> list[str]:
        rand = {
            "auto": f"randomized to {cfg.randomized_dim} dims when features x classes > "
            f"{MULTILINEAR_MAX} (randomized: auto)",
            True: f"randomized to {cfg.randomized_dim} dims",
            False: "full (randomized: false)",
        }[cfg.randomized]
        n = cfg.warmup_epochs
        warm = f", after {n} warm-up epoch{'s' * (n != 1)}" if n else ""
        return [
            *super(DANN, cls).plan_lines(cfg, epochs),  # the batchnorm line
            f"cdan        {'CDAN+E (entropy conditioning 1+exp(-H))' if cfg.entropy else 'CDAN'}:"
            f" discriminator ({cfg.hidden} hidden, BatchNorm) on the multilinear map of "
            f"features x softmax, {rand}",
            f"grl         tllib's warm start lambda = 2/(1+exp(-i/{GRL_MAX_ITERS})) - 1, i the "
            f"adapting steps from 0{warm}",
        ]

    @classmethod
    def summary_fields(cls, cfg: AdaptConfig) -> dict[str, Any]:
        return {**super().summary_fields(cfg), "entropy": cfg.entropy}

    def reversal(self) -> float:
        """tllib's warm start: lambda from the adapting steps done, uncapped."""
        return dann_lambda(self.progress[0], GRL_MAX_ITERS, GRL_ALPHA)

    def domain_term(
        self, feats: torch.Tensor, logits: torch.Tensor, tgt: torch.Tensor, lam: float
    ) -> torch.Tensor:
        """The conditional domain loss (DANN's forward, warm-up included, calls it)."""
        return cdan_loss(
            self.discriminator, self.mapping, feats.float(), logits.float(), tgt, lam,
            self.cfg.entropy,
        )  # fmt: skip


def _classes(model: nn.Module) -> int:
    """The classifier's output width: its last Linear layer's."""
    linears = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features
