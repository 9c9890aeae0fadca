"""tlkd: transfer learning and knowledge distillation for image models.

Importing ``tlkd`` loads neither torch nor timm (the CLI starts in a fraction of a second);
``tlkd.models`` registers the CIFAR models in timm's registry when first imported.
"""

__version__ = "0.1.0"
