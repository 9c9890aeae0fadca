"""The CIFAR distillation-benchmark models, registered in timm's model registry.

ResNet-20/32/56/110 and ResNet-8x4/32x4 (He et al. 2016, with the widths used in the CRD and
DKD papers' tables) and wide ResNets WRN-16-2/WRN-40-2 (Zagoruyko & Komodakis 2016), all with
small-input (32x32) stems. timm has no such models, so they are written here, with timm's
model interface (forward_features/forward_head/forward_intermediates, feature_info,
reset_classifier) so distillation losses and `features_only` work as for any timm model.
Importing tlkd.models registers them: ``timm.create_model("resnet56", num_classes=10)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    """Post-activation residual block (ResNet)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class WideBlock(nn.Module):
    """Pre-activation residual block (wide ResNet)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class CifarResNet(nn.Module):
    """A 3x3 stem and stages of residual blocks at 32, 16 and 8 px (4 px with four widths)."""

    def __init__(
        self,
        depth: int,
        widths: tuple[int, ...],
        wide: bool = False,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        block = WideBlock if wide else BasicBlock
        per_stage = (depth - 4) // 6 if wide else (depth - 2) // 6
        self.wide = wide
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.Identity() if wide else nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="conv1")]
        for i, cout in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks = [
                block(cin if j == 0 else cout, cout, stride if j == 0 else 1)
                for j in range(per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = cout
            self.feature_info.append(dict(num_chs=cout, reduction=2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.final_norm = nn.BatchNorm2d(cin) if wide else nn.Identity()
        self.num_features = self.head_hidden_size = cin
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return x if self.wide else F.relu(self.bn1(x))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.final_norm(x)) if self.wide else x

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(self.stages(self._stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stem and stage outputs (feature_info order), as timm models return them."""
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self._stem(x)
        if 0 in take:
            intermediates.append(x)
        last = len(self.stages) if not stop_early else max_index
        for i, stage in enumerate(self.stages[:last], start=1):
            x = stage(x)
            if i in take:
                is_last = i == len(self.stages)
                intermediates.append(self._norm(x) if (norm and is_last) else x)
        if intermediates_only:
            return intermediates
        return self._norm(x), intermediates


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


_ARCHS: dict[str, dict] = {
    "resnet20": dict(depth=20, widths=(16, 16, 32, 64)),
    "resnet32": dict(depth=32, widths=(16, 16, 32, 64)),
    "resnet56": dict(depth=56, widths=(16, 16, 32, 64)),
    "resnet110": dict(depth=110, widths=(16, 16, 32, 64)),
    "resnet8x4": dict(depth=8, widths=(32, 64, 128, 256)),
    "resnet32x4": dict(depth=32, widths=(32, 64, 128, 256)),
    "wrn_16_2": dict(depth=16, widths=(16, 32, 64, 128), wide=True),
    "wrn_40_2": dict(depth=40, widths=(16, 32, 64, 128), wide=True),
}

default_cfgs = generate_default_cfgs({name: _cfg() for name in _ARCHS})


def _create(variant: str, pretrained: bool, **kwargs) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(1, 2, 3)),
        **_ARCHS[variant],
        **kwargs,
    )


@register_model
def resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for 32x32 inputs (0.27M parameters)."""
    return _create("resnet20", pretrained, **kwargs)


@register_model
def resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for 32x32 inputs (0.46M parameters)."""
    return _create("resnet32", pretrained, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for 32x32 inputs (0.85M parameters)."""
    return _create("resnet56", pretrained, **kwargs)


@register_model
def resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for 32x32 inputs (1.7M parameters)."""
    return _create("resnet110", pretrained, **kwargs)


@register_model
def resnet8x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-8x4 (4x wider) for 32x32 inputs."""
    return _create("resnet8x4", pretrained, **kwargs)


@register_model
def resnet32x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32x4 (4x wider) for 32x32 inputs."""
    return _create("resnet32x4", pretrained, **kwargs)


@register_model
def wrn_16_2(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Wide ResNet-16-2 for 32x32 inputs."""
    return _create("wrn_16_2", pretrained, **kwargs)


@register_model
def wrn_40_2(pretrained: bool = False, **kwargs) -> CifarResNet:
    """Wide ResNet-40-2 for 32x32 inputs."""
    return _create("wrn_40_2", pretrained, **kwargs)
