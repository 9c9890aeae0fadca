"""FitNet hints (Romero et al. 2015) with RepDistiller's regressor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.errors import ConfigError


class ConvReg(nn.Module):
    """FitNet regressor as RepDistiller's ``ConvReg`` (``models/util.py``): a convolution
    chosen by the spatial sizes, then BatchNorm and ReLU, mapping student channels to the
    teacher's. A student map twice the teacher's: 3x3 conv, stride 2; half: 4x4 transposed
    conv, stride 2; otherwise, at least as large: a conv with kernel ``1 + s - t`` (1x1 at the
    same size); a smaller student map of another ratio is an error, as in the reference."""

    def __init__(
        self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], key: str = "fitnet"
    ) -> None:
        super().__init__()
        _, s_c, s_h, s_w = student_shape
        _, t_c, t_h, t_w = teacher_shape
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ConfigError(
                key,
                f"the student's {s_h}x{s_w} feature map is smaller than the teacher's "
                f"{t_h}x{t_w} (and not half of it): the FitNet regressor cannot map it; pick "
                "layers of matching resolution (student_layers, teacher_layers)",
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def fitnet_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """FitNet hints (Romero et al. 2015): mean squared error between the regressed student
    features and the teacher's (RepDistiller's ``HintLoss``, ``nn.MSELoss()``), summed over
    the chosen hint layers (one by default, as the reference)."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        total = total + F.mse_loss(s, t)
    return total


class FitNet(nn.Module):
    """One ConvReg per hint pair, built from the feature shapes; trained with the student."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.regressors = nn.ModuleList()

    def build(self, student_shapes, teacher_shapes, key: str) -> None:
        for s, t in zip(student_shapes, teacher_shapes, strict=True):
            if len(s) != 4 or len(t) != 4:
                raise ConfigError(key, "fitnet needs NCHW feature maps")
            self.regressors.append(ConvReg(tuple(s), tuple(t), key))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        regressed = [reg(s) for reg, s in zip(self.regressors, student, strict=True)]
        return fitnet_loss(regressed, teacher)
