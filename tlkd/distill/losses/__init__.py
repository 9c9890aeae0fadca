"""Distillation losses, one module per loss type (registered in tlkd/distill/registry.py).

Each module holds the loss as a plain function of tensors (unit-tested on hand-made tensors,
and against transcriptions of the papers' reference code in tests/test_*parity*.py)
and its ``Term``, the ``nn.Module`` the objective calls. The formulas follow the papers cited
on each function; the code is tlkd's own.
"""

from tlkd.distill.losses.at import at_loss, attention_map
from tlkd.distill.losses.dist import dist_loss
from tlkd.distill.losses.dkd import dkd_loss
from tlkd.distill.losses.ensemble import ensemble_logits
from tlkd.distill.losses.fitnet import ConvReg, fitnet_loss
from tlkd.distill.losses.hard import hard_loss
from tlkd.distill.losses.kd import kd_loss, kd_loss_from_probs

__all__ = [
    "ConvReg", "at_loss", "attention_map", "dist_loss", "dkd_loss", "ensemble_logits",
    "fitnet_loss", "hard_loss", "kd_loss", "kd_loss_from_probs",
]  # fmt: skip
