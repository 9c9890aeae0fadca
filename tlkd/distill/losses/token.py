"""DeiT token distillation (Touvron et al. 2021): the distillation head learns the teacher.

Students are timm's ``deit_*_distilled_*`` models: a class token with its head and a
distillation token with its own head. Trained with ``set_distilled_training(True)`` they
return ``(class_logits, distillation_logits)``; this term reads the second (the registry
entry's ``head="dist"``), the other terms the first (so ``ce`` is DeiT's base criterion on the
class head). In eval mode timm's model averages the two heads, which is how DeiT predicts, so
evaluate, export and the saved weights need nothing special.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_loss(
    student: torch.Tensor, teacher: torch.Tensor, mode: str = "hard", temperature: float = 1.0
) -> torch.Tensor:
    """DeiT's ``DistillationLoss`` term (facebookresearch/deit ``losses.py``): ``hard``, the
    cross-entropy of the distillation head against the teacher's top class; ``soft``, KL at
    temperature T summed over batch and classes and divided by their product (DeiT's
    ``reduction='sum' ... / outputs_kd.numel()``, so C times smaller than ``kd``'s per-sample
    mean), times T^2."""
    if mode == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    log_p_s = F.log_softmax(student / temperature, dim=1)
    log_p_t = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    return kl * temperature**2 / student.numel()


class Token(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.mode, self.temperature = cfg.mode, cfg.temperature

    def plan_line(self) -> str:
        target = "top class" if self.mode == "hard" else f"softmax at T={self.temperature:g}"
        return (
            f"the distillation token's head learns the teacher's {target}; evaluate and "
            "export average the class and distillation heads (DeiT)"
        )

    def forward(self, student, teacher, targets=None) -> torch.Tensor:
        return token_loss(student, teacher, self.mode, self.temperature)
