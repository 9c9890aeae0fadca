"""Minimal hand-written PyTorch loops: the baselines tlkd is measured against.

    python -m bench.handloop train-files --train DIR --model resnet20 --batch-size 128
    python -m bench.handloop train-fixed --model resnet20 --batch-size 128 --steps 40
    python -m bench.handloop eval-files --val DIR --model resnet20 --batch-size 128
    python -m bench.handloop kd-files --train DIR --teacher resnet56 --teacher-weights F

Prints one JSON line. train-files: torchvision ImageFolder with the transform tlkd builds
(timm's random resized crop at scale 0.7-1, flip, normalise), DataLoader workers, AdamW; the time
runs from creating the iterator to the last optimizer step, as tlkd's train_img_per_s does.
train-fixed: one batch already in memory, trained on repeatedly: the compute ceiling
(--compile: torch.compile'd; warmup_s holds the compilation).
eval-files: an inference_mode loop over the val folder (resize/crop, normalise).
kd-files: the hand-written distillation loop: train-files' data and student, the teacher run
under inference_mode on the same batch, loss 0.9 KD (T=4, Hinton's T^2 scaling) + 0.1 CE.
--size: the input size (train-fixed's random batch; train-files' crop).
--uint8 (train-files, eval-files): the workers hand over uint8 images (timm's transforms with
use_prefetcher=True) and the loop normalises whole batches, the data path tlkd's loader workers
use; without it, the usual per-image ToTensor + Normalize in the workers.
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import datasets

import tlkd.models.cifar  # noqa: F401  registers resnet20/56 in timm


def _model(args, name: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name or args.model, num_classes=10)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _autocast(args):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)


class _BatchNormalize:
    """uint8 batches -> normalised float batches (with --uint8; else the identity), with the
    mean and std create_transform normalises by default."""

    def __init__(self, args) -> None:
        self.on = args.uint8
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().sub_(self.mean).div_(self.std) if self.on else x


def _step(model, opt, x, y, args) -> None:
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(args):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _train_loader(args) -> torch.utils.data.DataLoader:
    # the transform tlkd builds for this config, made the way a timm user would
    tf = create_transform(
        args.size, is_training=True, scale=(0.7, 1.0), hflip=0.5, color_jitter=None,
        use_prefetcher=args.uint8,
    )  # fmt: skip
    ds = datasets.ImageFolder(args.train, tf)
    return torch.utils.data.DataLoader(
        ds, args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
    )


def train_files(args) -> dict:
    norm = _BatchNormalize(args)
    loader = _train_loader(args)
    model = _model(args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    seen = 0
    t0 = time.perf_counter()
    for x, y in loader:
        _step(model, opt, norm(x), y, args)
        seen += len(y)
    return {"img_s": seen / (time.perf_counter() - t0), "images": seen}


def train_fixed(args) -> dict:
    model = _model(args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    if args.compile:
        model = torch.compile(model)
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch_size,))
    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (and compilation), not in img_s
        _step(model, opt, x, y, args)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        _step(model, opt, x, y, args)
    seen = args.steps * args.batch_size
    return {"img_s": seen / (time.perf_counter() - t0), "images": seen, "warmup_s": warmup_s}


def kd_files(args) -> dict:
    from safetensors.torch import load_file

    norm = _BatchNormalize(args)
    loader = _train_loader(args)
    teacher = _model(args, args.teacher).eval()
    if args.teacher_weights:
        teacher.load_state_dict(load_file(args.teacher_weights))
    student = _model(args).train()
    opt = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.05)
    T = 4.0
    seen = 0
    t0 = time.perf_counter()
    for x, y in loader:
        x = norm(x)
        with torch.inference_mode():
            t_logits = teacher(x)
        # an inference tensor cannot be saved for backward: a normal copy for the loss
        soft = F.softmax(t_logits.clone() / T, dim=1)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / T, dim=1), soft, reduction="batchmean") * T * T
        loss = 0.9 * kd + 0.1 * F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += len(y)
    return {"img_s": seen / (time.perf_counter() - t0), "images": seen}


@torch.inference_mode()
def eval_files(args) -> dict:
    tf = create_transform(32, is_training=False, crop_pct=1.0, use_prefetcher=args.uint8)
    norm = _BatchNormalize(args)
    ds = datasets.ImageFolder(args.val, tf)
    loader = torch.utils.data.DataLoader(ds, args.batch_size, num_workers=args.workers)
    model = _model(args).eval()
    seen = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            x = norm(x)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(args):
                model(x)
            seen += len(x)
    return {"img_s": seen / (time.perf_counter() - t0), "images": seen}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train-files", "train-fixed", "eval-files", "kd-files"])
    p.add_argument("--train")
    p.add_argument("--val")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--uint8", action="store_true")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--teacher-weights")
    args = p.parse_args()
    run = {
        "train-files": train_files,
        "train-fixed": train_fixed,
        "eval-files": eval_files,
        "kd-files": kd_files,
    }
    print(json.dumps(run[args.mode](args)))


if __name__ == "__main__":
    main()
