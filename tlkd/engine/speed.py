"""Inference speed of a model: median latency at batch 1 and throughput at a batch size.

Timed by hand rather than with ``torch.utils.benchmark.Timer``: the figures are medians of
single forward passes (``Timer.blocked_autorange`` reports means of blocks), and CUDA needs
an explicit synchronise around each pass."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from tlkd.engine.device import autocast


@torch.inference_mode()
def measure_speed(
    model: nn.Module,
    image_size: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool = False,
    latency_runs: int = 30,
    throughput_runs: int = 5,
) -> dict[str, float]:
    """Median latency at batch 1 (ms per image) and throughput at ``batch_size`` (images/s)
    on random input, after warm-up."""
    modes = [m.training for m in model.modules()]
    model.eval()

    def timed(batch: int, runs: int) -> list[float]:
        x = torch.randn(batch, 3, image_size, image_size, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        times = []
        for i in range(runs + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast(device, dtype):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:  # warm-up runs are not timed
                times.append(time.perf_counter() - t0)
        return times

    latency = statistics.median(timed(1, latency_runs)) * 1000
    throughput = batch_size / statistics.median(timed(batch_size, throughput_runs))
    for module, mode in zip(model.modules(), modes, strict=True):
        module.training = mode
    return {"latency_ms": latency, "throughput_img_per_s": throughput}
