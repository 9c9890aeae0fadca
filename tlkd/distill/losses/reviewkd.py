"""Knowledge review (Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review"):
the student's features, fused from the deepest level to the shallowest by attention-based
fusion (ABF) modules, are matched to the teacher's by the hierarchical context loss (HCL).
Conventions as mdistiller (``mdistiller/distillers/ReviewKD.py``) and the authors'
dvlab-research/ReviewKD CIFAR-100 code; the code here is tlkd's own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tlkd.errors import ConfigError

HCL_LEVELS = (4, 2, 1)  # the pooled pyramid's output sizes, each at half the previous weight


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A pooled ``(N, C)`` feature as a ``(N, C, 1, 1)`` map; maps pass through."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


def hcl_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss, summed over levels. Per level: the MSE of the full maps
    (weight 1) plus the MSE of both maps adaptive-average-pooled to 4x4, 2x2 and 1x1
    (weights 1/2, 1/4, 1/8; only the sizes below the map's height), over the weights' sum."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        value, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in HCL_LEVELS:
            if size >= s.shape[2]:
                continue
            weight /= 2.0
            pooled_s = F.adaptive_avg_pool2d(s, (size, size))
            pooled_t = F.adaptive_avg_pool2d(t, (size, size))
            value = value + weight * F.mse_loss(pooled_s, pooled_t)
            weights += weight
        total = total + value / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion of one level. The student's map is projected to ``mid``
    channels (1x1 conv, BN); with ``fuse``, the deeper level's fused map (nearest-resized to
    this one) is mixed in by two sigmoid attention maps from a 1x1 conv over both. The result,
    nearest-resized to the teacher's size, goes on to the next level; a 3x3 conv and BN map it
    to the teacher's channels for the loss."""

    def __init__(self, in_channels: int, mid: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.project = nn.Sequential(
            nn.Conv2d(in_channels, mid, kernel_size=1, bias=False), nn.BatchNorm2d(mid)
        )
        self.output = nn.Sequential(
            nn.Conv2d(mid, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.attention = nn.Conv2d(2 * mid, 2, kernel_size=1) if fuse else None
        for conv in (self.project[0], self.output[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # as the reference

    def forward(
        self, x: torch.Tensor, deeper: torch.Tensor | None, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output for the loss, fused map for the next, shallower level)``."""
        x = self.project(x)
        if self.attention is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=tuple(x.shape[2:]), mode="nearest")
            att = torch.sigmoid(self.attention(torch.cat([x, deeper], dim=1)))
            x = x * att[:, 0:1] + deeper * att[:, 1:2]
        if tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.output(x), x


class ReviewKD(nn.Module):
    """One ABF per level, levels ordered shallow to deep (the default ``review`` layers: the
    last three stages and the pooled ``pre_logits``). The deepest ABF fuses nothing; each
    shallower one fuses the result of the one below. ``mid`` channels: the deepest student
    level's, at most ``max_mid_channel``. Built from the feature shapes; trained with the
    student, not saved with it."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.max_mid_channel = cfg.max_mid_channel
        self.abfs = nn.ModuleList()

    def build(self, student_shapes, teacher_shapes, key: str) -> None:
        s_shapes = [_map_shape(s, key) for s in student_shapes]
        t_shapes = [_map_shape(t, key) for t in teacher_shapes]
        mid = min(self.max_mid_channel, s_shapes[-1][1])
        deepest = len(s_shapes) - 1
        for i, (s, t) in enumerate(zip(s_shapes, t_shapes, strict=True)):
            self.abfs.append(ABF(s[1], mid, t[1], fuse=i < deepest))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        student = [as_map(s) for s in student]
        teacher = [as_map(t) for t in teacher]
        outputs: list[torch.Tensor] = [None] * len(student)  # type: ignore[list-item]
        fused = None
        for i in reversed(range(len(student))):
            outputs[i], fused = self.abfs[i](student[i], fused, tuple(teacher[i].shape[2:]))
        return hcl_loss(outputs, teacher)


def _map_shape(shape: tuple[int, ...], key: str) -> tuple[int, int, int, int]:
    if len(shape) == 2:
        return (shape[0], shape[1], 1, 1)
    if len(shape) != 4:
        raise ConfigError(
            key, f"reviewkd needs NCHW feature maps or pooled (N, C) features, got {tuple(shape)}"
        )
    return tuple(shape)  # type: ignore[return-value]
