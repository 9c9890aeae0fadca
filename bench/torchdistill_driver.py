"""One epoch of knowledge distillation with torchdistill 1.1.5, then one evaluation pass.

Runs in torchdistill's own venv (``~/.cache/tlkd-bench/td-venv``), not tlkd's, and drives
torchdistill through its public library API rather than its example scripts:

* ``torchdistill.core.distillation.get_distillation_box(...)`` builds the box from a plain
  ``train_config`` dict (no YAML): the box makes the train/val DataLoaders itself from the
  datasets it is given, the optimizer from its registry (``AdamW``) and the loss from its
  registry (``WeightedSumLoss`` over one ``KDLoss`` term);
* each epoch step is the box's own: ``pre_epoch_process`` -> for every batch of
  ``box.train_data_loader`` ``forward_process`` (teacher under no_grad, student, loss) and
  ``post_forward_process`` (backward, optimizer step) -> ``post_epoch_process``;
* the evaluation is torchdistill's usual one: the student in ``eval()`` under
  ``torch.inference_mode()``, over ``box.val_data_loader``, top-1 in percent.

It maps onto ``tlkd distill`` with
``losses: [{type: kd, weight: 0.9, temperature: 4}, {type: ce, weight: 0.1}]``, AdamW
(lr 2e-3, weight decay 0.05, no schedule), fp32 on the CPU:

* torchdistill's ``KDLoss`` is ``alpha * CE + (1 - alpha) * T^2 * KL(batchmean)``, so tlkd's
  0.9 KD + 0.1 CE is ``alpha=0.1`` (the CE weight), ``temperature=4``;
* the teacher is frozen (``requires_grad: False``, so the box runs it under ``no_grad``) and
  put in ``eval()`` here, as tlkd's is; torchdistill leaves the teacher's mode to the user;
* the transforms are those tlkd builds: random resized crop to 32 at scale 0.7-1 and ratio
  3/4-4/3, horizontal flip, ImageNet mean/std normalisation; evaluation: normalisation only.
* train loader: shuffled, ``drop_last``, ``--workers`` processes; val loader: in order.

``--max-train-images N`` / ``--max-val-images M`` take a fixed subset: the first N (M) indices
of ``torch.randperm(len(folder), generator=torch.Generator().manual_seed(0))``; without them
the whole folder is used (the harness passes pre-subset folders).

Measured: ``train_seconds`` from just before the train loader's iterator is created (worker
start-up included) to after the epoch's last optimizer step; ``eval_seconds`` likewise for the
evaluation pass; images/s for both and the student's top-1. Logs go to stderr; stdout gets one
JSON line.

    python bench/torchdistill_driver.py --train DIR --val DIR --teacher resnet56 \\
        --teacher-weights FILE --student resnet20 --batch-size 128 --workers 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torchdistill
import torchvision
from safetensors.torch import load_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import Dataset, RandomSampler, SequentialSampler, Subset
from torchdistill.common.main_util import set_seed
from torchdistill.core.distillation import DistillationBox, get_distillation_box
from torchvision import datasets, transforms

# the CIFAR ResNets live in tlkd/models/cifar.py (torch and timm only); tlkd's package
# __init__ imports nothing else, so the repository root on sys.path is all it takes
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tlkd.models.cifar  # noqa: E402,F401  registers resnet20/resnet56 ... in timm

TEMPERATURE = 4.0
CE_WEIGHT = 0.1  # KDLoss's alpha; the KL term gets 1 - alpha = 0.9 (times T^2)
LR = 2e-3
WEIGHT_DECAY = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, type=Path, help="ImageFolder of training images")
    p.add_argument("--val", required=True, type=Path, help="ImageFolder of evaluation images")
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--teacher-weights", required=True, type=Path, help=".safetensors state dict")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-train-images", type=int, default=None)
    p.add_argument("--max-val-images", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def subset(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` indices of a fixed (seed 0) permutation; all of ``ds`` when n is None."""
    if n is None or n >= len(ds):
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    return Subset(ds, order[:n].tolist())


def build_datasets(args: argparse.Namespace) -> dict[str, Dataset]:
    normalize = transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    train_tf = transforms.Compose([
        transforms.RandomResizedCrop(32, scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(0.5),
        transforms.ToTensor(),
        normalize,
    ])  # fmt: skip
    val_tf = transforms.Compose([transforms.ToTensor(), normalize])
    train = datasets.ImageFolder(str(args.train), train_tf)
    val = datasets.ImageFolder(str(args.val), val_tf)
    return {
        "train": subset(train, args.max_train_images),
        "val": subset(val, args.max_val_images),
    }


def build_models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    teacher = timm.create_model(args.teacher, num_classes=args.num_classes)
    teacher.load_state_dict(load_file(str(args.teacher_weights)), strict=True)
    teacher.eval()  # torchdistill never changes the teacher's mode; tlkd's runs in eval mode
    student = timm.create_model(args.student, num_classes=args.num_classes)
    return teacher, student


def train_config(args: argparse.Namespace) -> dict[str, Any]:
    """The box's configuration, as the dict its YAML files would load to."""

    def loader(dataset_id: str, sampler: type, train: bool) -> dict[str, Any]:
        return {
            "dataset_id": dataset_id,
            "sampler": {"class_or_func": sampler, "kwargs": {}},
            "kwargs": {
                "batch_size": args.batch_size,
                "num_workers": args.workers,
                "drop_last": train,
            },
        }

    kd = {
        "key": "KDLoss",
        "kwargs": {
            "student_module_path": ".",  # "." is the model's own output (no forward hooks)
            "student_module_io": "output",
            "teacher_module_path": ".",
            "teacher_module_io": "output",
            "temperature": TEMPERATURE,
            "alpha": CE_WEIGHT,
            "reduction": "batchmean",
        },
    }
    return {
        "num_epochs": 1,
        # requires_supp (the default for training) wraps the dataset to yield a third, empty
        # "supplementary" dict per sample; the val loader yields (image, target)
        "train_data_loader": loader("train", RandomSampler, train=True),
        "val_data_loader": loader("val", SequentialSampler, train=False),
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": "AdamW", "kwargs": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}},
        },
    }


def train_one_epoch(box: DistillationBox, device: torch.device) -> dict[str, float]:
    box.pre_epoch_process(epoch=0)
    images, steps, loss_sum = 0, 0, 0.0
    t0 = time.perf_counter()
    for sample_batch, targets, supp_dict in box.train_data_loader:
        sample_batch, targets = sample_batch.to(device), targets.to(device)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)  # backward + optimizer step
        loss_sum += loss.item()
        images += sample_batch.shape[0]
        steps += 1
    seconds = time.perf_counter() - t0
    box.post_epoch_process()
    return {
        "train_seconds": seconds,
        "train_images": images,
        "train_img_s": images / seconds,
        "train_steps": steps,
        "train_loss_mean": loss_sum / max(steps, 1),
    }


@torch.inference_mode()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> dict:
    model.eval()
    images, correct = 0, 0
    t0 = time.perf_counter()
    for image, target in loader:
        image, target = image.to(device), target.to(device)
        output = model(image)
        correct += int((output.argmax(dim=1) == target).sum())
        images += image.shape[0]
    seconds = time.perf_counter() - t0
    return {
        "eval_seconds": seconds,
        "eval_images": images,
        "eval_img_s": images / seconds,
        "eval_top1": 100.0 * correct / max(images, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    torch.set_num_threads(args.threads)
    set_seed(args.seed)  # torchdistill's: random, numpy, torch
    device = torch.device("cpu")

    dataset_dict = build_datasets(args)
    teacher, student = build_models(args)
    t0 = time.perf_counter()
    box = get_distillation_box(
        teacher, student, dataset_dict, train_config(args), device,
        device_ids=None, distributed=False, lr_factor=1,
    )  # fmt: skip
    setup_seconds = time.perf_counter() - t0
    print(f"distillation box: {type(box).__name__}; criterion: {box.criterion}", file=sys.stderr)
    print(f"optimizer: {box.optimizer}", file=sys.stderr)

    result: dict[str, Any] = {"driver": "torchdistill", "box_setup_seconds": setup_seconds}
    result.update(train_one_epoch(box, device))
    result.update(evaluate(box.student_model, box.val_data_loader, device))
    box.clean_modules()
    result["versions"] = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torchdistill": torchdistill.__version__,
        "timm": timm.__version__,
    }
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
