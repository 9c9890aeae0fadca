"""Function matching (Beyer et al. 2022): teacher and student see the same mixed images.

"Knowledge distillation: A good teacher is patient and consistent" trains the student to match
the teacher's function on mixed-up images (kd at T=1, no labels, long schedules): both models
see the very same image, mixed inside the batch, every step. big_vision's reference config
(``configs/proj/distill/bit_i1k.py``) mixes with ``mixup p=1.0`` (one coefficient per batch,
drawn uniformly, then ``max(a, 1 - a)`` so each image keeps the larger share: ``utils.get_mixup``)
and ``kl`` at ``t=1``.

timm's ``Mixup`` mixes labels too and requires an even batch (it mixes the batch with itself
reversed, which leaves the middle image of an odd batch unmixed); here only the images are
mixed, each with its neighbour, as big_vision's ``utils.get_mixup`` (``jnp.roll(x, 1, 0)``),
so every image of any batch of two or more is mixed. timm's parameter conventions otherwise:
one coefficient per batch from Beta(alpha, alpha), CutMix boxes from
``timm.data.mixup.cutmix_bbox_and_lam``, numpy's global RNG as timm does (checkpointed, so
resumes are exact).
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data.mixup import cutmix_bbox_and_lam


class BatchMix:
    """Mix each image of a batch with its neighbour (the batch rolled by one, as big_vision):
    mixup or CutMix, one draw per batch."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, switch_prob: float) -> None:
        self.mixup_alpha, self.cutmix_alpha, self.switch_prob = (
            mixup_alpha,
            cutmix_alpha,
            switch_prob,
        )

    def _draw(self) -> tuple[float, bool]:
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or np.random.rand() < self.switch_prob
        )
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(np.random.beta(alpha, alpha))
        # mixup: each image keeps the larger share (big_vision's get_mixup), so the unmixed
        # labels train_top1 reads stay the images' dominant ones; CutMix: timm's box from lam
        return (lam if use_cutmix else max(lam, 1.0 - lam)), use_cutmix

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        lam, use_cutmix = self._draw()
        partner = images.roll(1, dims=0)
        if use_cutmix:
            (y0, y1, x0, x1), _ = cutmix_bbox_and_lam(images.shape, lam)
            mixed = images.clone()
            mixed[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
            return mixed
        return images * lam + partner * (1.0 - lam)
