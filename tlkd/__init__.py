"""tlkd: transfer learning and knowledge distillation for image models."""

__version__ = "0.1.0"

from tlkd.models import cifar as _cifar  # noqa: E402,F401  registers the CIFAR models in timm
