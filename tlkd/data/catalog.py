"""Names of the datasets tlkd can build (kept import-light: the schema reads it)."""

from __future__ import annotations

# torchvision dataset name -> (class name, kwargs of the train split, kwargs of the val split,
# attribute holding the labels). Val is each dataset's official test split.
TORCHVISION_DATASETS: dict[str, tuple[str, dict, dict, str]] = {
    "cifar10": ("CIFAR10", {"train": True}, {"train": False}, "targets"),
    "cifar100": ("CIFAR100", {"train": True}, {"train": False}, "targets"),
    "mnist": ("MNIST", {"train": True}, {"train": False}, "targets"),
    "fashion_mnist": ("FashionMNIST", {"train": True}, {"train": False}, "targets"),
    "kmnist": ("KMNIST", {"train": True}, {"train": False}, "targets"),
    "svhn": ("SVHN", {"split": "train"}, {"split": "test"}, "labels"),
    "stl10": ("STL10", {"split": "train"}, {"split": "test"}, "labels"),
    "flowers102": ("Flowers102", {"split": "train"}, {"split": "test"}, "_labels"),
    "oxford_pets": ("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}, "_labels"),
    "dtd": ("DTD", {"split": "train"}, {"split": "test"}, "_labels"),
    "food101": ("Food101", {"split": "train"}, {"split": "test"}, "_labels"),
}

# Datasets of tiny images: without data.image_size they train at 32x32 with no eval crop,
# instead of being upscaled to the model's default (often 224) input size.
SMALL_IMAGE_DATASETS = {"digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "kmnist", "svhn"}

DATASET_NAMES: tuple[str, ...] = ("folder", "digits", *TORCHVISION_DATASETS)
