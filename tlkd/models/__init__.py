"""Models from the timm registry: building, new heads, local weights and freezing.

Importing this package registers the CIFAR models (tlkd/models/cifar.py) in timm's registry,
so ``timm.create_model("resnet56")`` works after ``import tlkd.models``."""

from tlkd.models import cifar as _cifar  # noqa: F401  registers the CIFAR models in timm
