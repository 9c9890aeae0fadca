"""``precision: auto`` and ``channels_last: auto``: settled per device and per model.

On GPUs the choice is fixed (bf16 autocast where supported, else fp16; channels_last on). On
CPUs the best setting depends on the model as much as on the CPU: on the 2-core AMX CPU of
docs/performance.md, bf16 autocast with channels_last trains a CIFAR ResNet-20 2.2x faster than
fp32, while the same settings make an ImageNet-stem ResNet-18 at 32 px 2x slower. So on CPUs
``auto`` times a few forward/backward steps of a copy of the model on a random batch for each
candidate and keeps the fastest (a default must win by 10% to be replaced). The choice is
written into the run's config, so a rerun or resume uses the same settings without measuring,
and remembered in the cache folder, so the runs of a sweep share one measurement.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tlkd.engine import distributed
from tlkd.engine.device import autocast
from tlkd.run.rundir import replacing

MARGIN = 1.10  # a candidate must be this much faster than the plain setting to be chosen


def cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def has_conv(model: nn.Module) -> bool:
    return any(p.dim() == 4 for p in model.parameters())


def step_time(
    model: nn.Module,
    batch: torch.Tensor,
    dtype: torch.dtype | None,
    channels_last: bool,
    train: bool,
    steps: int = 3,
    warmup: int = 2,
) -> float:
    """Median seconds of one forward (+ backward when ``train``) of ``model`` on ``batch``."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    batch = batch.contiguous(memory_format=memory_format)
    model.train(train)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train), autocast(batch.device, dtype):
            out = model(batch)
        if train:
            out.float().sum().backward()
            model.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def choose(
    precision: str,
    channels_last: bool | str,
    model: nn.Module,
    device: torch.device,
    batch_shape: tuple[int, ...],
    train: bool,
    log: Callable[[str], None],
    cache_dir: Path | None,
    measure: bool = True,
) -> tuple[str | bool, ...]:
    """Concrete (precision, channels_last) for ``auto`` settings; rank 0 decides under DDP.
    A measurement is remembered in ``cache_dir`` for the same model, shapes, CPU and torch
    (None: an unusable cache folder, nothing remembered).
    With ``measure`` off (dry runs) a CPU setting to be timed stays ``auto``."""
    if precision != "auto" and channels_last != "auto":
        return precision, bool(channels_last)
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return (
            ("bf16" if bf16 else "fp16") if precision == "auto" else precision,
            True if channels_last == "auto" else bool(channels_last),
        )
    if device.type != "cpu":  # mps: plain settings
        return (
            "fp32" if precision == "auto" else precision,
            False if channels_last == "auto" else bool(channels_last),
        )
    precisions = [precision] if precision != "auto" else ["fp32"]
    if precision == "auto" and cpu_bf16_supported():
        precisions.append("bf16")
    layouts = [bool(channels_last)] if channels_last != "auto" else [False]
    if channels_last == "auto" and has_conv(model):
        layouts.append(True)
    if len(precisions) * len(layouts) == 1:
        return precisions[0], layouts[0]
    if not measure:  # every rank returns here: no broadcast for a dry run to wait on
        return precision, channels_last
    chosen = None
    if distributed.info().is_main:
        key = memo_key(model, batch_shape, train, precisions, layouts)
        known = remembered(cache_dir)
        if key in known:  # measured before on this machine: every run of a sweep agrees
            chosen = tuple(known[key])
            log(
                f"auto        precision {chosen[0]}, channels_last {str(chosen[1]).lower()} "
                f"(measured before, {cache_dir / TUNE_FILE})"
            )
        else:
            # the RNG as it was after: dropout in the timed steps draws from it, and a run that
            # measures must continue like one that remembers
            with torch.random.fork_rng(devices=[]):
                chosen, timings = _measure(model, device, batch_shape, train, precisions, layouts)
            shown = ", ".join(
                f"{p}{'+cl' if c else ''} {1 / t:.1f} steps/s" for (p, c), t in timings
            )
            log(
                f"auto        measured {shown}: precision {chosen[0]}, "
                f"channels_last {str(chosen[1]).lower()}"
            )
            remember(cache_dir, key, chosen)
    return distributed.broadcast(chosen)


TUNE_FILE = "tune.json"


def memo_key(model, batch_shape, train, precisions, layouts) -> str:
    """What a measurement depends on: model, shapes, candidates, CPU and torch (also the key of
    ``teacher.runtime: auto``'s choice, tlkd/distill/runtime.py)."""
    import platform

    params = sum(p.numel() for p in model.parameters())
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), cpu)
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (
        f"{type(model).__name__}|{params}|{list(batch_shape)}|{train}|{precisions}|{layouts}|"
        f"{cpu}|{threads} threads|torch {torch.__version__}"
    )


def remembered(cache_dir: Path | None) -> dict:
    """The choices measured before on this machine (``cache_dir``'s tune.json)."""
    if cache_dir is None:
        return {}
    try:
        return json.loads((cache_dir / TUNE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def remember(cache_dir: Path | None, key: str, chosen: tuple[str, bool]) -> None:
    """Keep a measured choice for the next run (nothing when the folder is unusable)."""
    if cache_dir is None:
        return
    known = remembered(cache_dir)
    known[key] = list(chosen)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with replacing(cache_dir / TUNE_FILE, durable=False) as tmp:
            tmp.write_text(json.dumps(known, indent=1))
    except OSError:  # a read-only cache: measure again next time
        pass


STEP_BUDGET_S = 1.5  # larger models are timed on a smaller batch: measuring stays under ~30 s


def _measure(model, device, batch_shape, train, precisions, layouts):
    probe = copy.deepcopy(model)  # BatchNorm statistics and gradients of the real model untouched
    for p in probe.parameters():
        p.requires_grad_(True)
    # its own generator: a run that measures and one that remembers the choice must draw the
    # same random numbers afterwards (what is initialised after the build)
    batch = torch.randn(batch_shape, generator=torch.Generator().manual_seed(0)).to(device)
    # one plain step on 4 images sizes the batch: a ResNet-50 at 224 px would otherwise take
    # minutes here (20 steps of batch 64 on 2 cores); a CIFAR model keeps its real batch
    per_image = step_time(probe, batch[:4], None, False, train, steps=1, warmup=1) / 4
    batch = batch[: max(4, min(len(batch), int(STEP_BUDGET_S / max(per_image, 1e-9))))]
    timings = []
    for p in precisions:
        for cl in layouts:
            dtype = torch.bfloat16 if p == "bf16" else None
            timings.append(((p, cl), step_time(probe, batch, dtype, cl, train)))
    base = timings[0][1]
    best, best_t = timings[0]
    for key, t in timings[1:]:
        if t * MARGIN < base and t < best_t:
            best, best_t = key, t
    return best, timings


# train.compile: auto. torch.compile pays its compilation once per run and gains a share of
# every later step. A fixed rule, not a measurement per run: off on CPU and mps, because on a
# CPU the sign of the gain depends on the model (docs/performance.md section 10, fp32 on 2
# cores: 0.80x to 2.51x per step over resnet20, resnet18 and mobilenetv3_small_100 at 32 and
# 224 px, 18-69 s to compile; a 120-step tlkd run 0.71x), so no step count makes every run
# faster; on for CUDA runs of 2,000+ steps (not measured here: no GPU was lent).
COMPILE_MIN_STEPS = {"cuda": 2000}  # device type -> planned steps from which auto compiles


def _compiler_available(device: torch.device) -> bool:
    """Dynamo runs on this Python and, on GPUs, Triton (inductor's kernel compiler) is there."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            return bool(has_triton())
    except (ImportError, RuntimeError):
        return False
    return True


def compile_rule(device: torch.device, planned_steps: int) -> tuple[bool, str]:
    """``train.compile: auto``: whether to compile, and why (for the plan)."""
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    least = COMPILE_MIN_STEPS.get(device.type)
    if least is not None and not _compiler_available(device):
        return False, f"torch.compile cannot compile for {device.type} here (no Triton)"
    if least is None:
        return False, (
            f"on {device.type} whether compiling pays depends on the model: 0.8-2.5x per step "
            "for 18-69 s of compilation (docs/performance.md section 10)"
        )
    if planned_steps < least:
        return False, f"{planned_steps:,} steps: too short to pay back the compilation"
    return True, f"{planned_steps:,} steps on {device.type}"
