"""tlkd: transfer learning and knowledge distillation for image models."""

__version__ = "0.1.0"
