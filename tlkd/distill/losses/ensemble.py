"""Several teachers as one (the rule every logit loss uses)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tlkd.distill.losses.kd import standardize_logits


def ensemble_logits(
    teachers: list[torch.Tensor],
    weights: list[float],
    temperature: float = 1.0,
    standardize: bool = False,
) -> torch.Tensor:
    """Logits ``z`` whose ``softmax(z / T)`` is the weighted mean of the teachers'
    ``softmax(z_i / T)`` (averaged soft targets, as in multi-teacher KD: Hinton et al. 2015's
    ensembles, Fukuda et al. 2017, You et al. 2017). Every logit loss uses this rule at its own
    temperature (T=1 for a loss without one), so kd, hard, dkd and dist see the same ensemble.
    One teacher is returned unchanged.

    ``standardize`` (a loss with ``standardize: true``): each teacher's logits are z-scored
    first (:func:`~tlkd.distill.losses.kd.standardize_logits`), so the mean is of
    ``softmax(std(z_i) / T)`` at the base temperature and no teacher counts more for its
    larger logit scale; one teacher is returned standardized."""
    if standardize:
        teachers = [standardize_logits(t) for t in teachers]
    if len(teachers) == 1:
        return teachers[0]
    log_w = torch.tensor([math.log(w / sum(weights)) for w in weights], device=teachers[0].device)
    log_p = torch.stack([F.log_softmax(t / temperature, dim=1) for t in teachers])
    return temperature * torch.logsumexp(log_p + log_w.view(-1, 1, 1), dim=0)
