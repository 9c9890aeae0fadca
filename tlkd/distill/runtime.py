"""How a frozen teacher's forward pass runs (``teacher.runtime``): PyTorch (``torch``), PyTorch
in channels_last (``channels_last``), or an onnxruntime session of the exported teacher
(``onnxruntime``).

A teacher never trains, so an inference engine may run it: on this project's 2-core CPU a
resnet56 forward pass (batch 64, fp32) took 319 ms in PyTorch, 267 ms in channels_last and
124 ms through onnxruntime (docs/performance.md section 10), and in distillation the teacher's
forward pass is about half of every step. ``auto`` times each candidate on a batch of the
run's shape at the start (a few seconds) and keeps the fastest when it wins by 10%, on CPUs;
the choice is remembered in the cache folder like ``precision: auto``'s. onnxruntime serves
teachers read for their logits only (not feature losses, not train_bn) and needs the
``tlkd[export]`` extra; on GPUs the teacher runs in PyTorch (channels_last, autocast).
"""

from __future__ import annotations

import io
import time
import warnings

import torch
from torch import nn

from tlkd.engine import tune
from tlkd.engine.device import autocast

RUNTIMES = ("torch", "channels_last", "onnxruntime")


class OrtForward:
    """The teacher exported to ONNX (torch.onnx's TorchScript exporter: a few seconds) and run
    by an onnxruntime CPU session with torch's thread count; images in, logits out."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        import onnxruntime as ort

        buf = io.BytesIO()
        kwargs = dict(
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}},
        )  # fmt: skip
        with warnings.catch_warnings():  # torch's notice that this exporter is the old one
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    model.float().eval(), (example.float(),), buf, dynamo=False, **kwargs
                )
            except TypeError:  # a torch without the dynamo switch: its exporter is this one
                torch.onnx.export(model.float().eval(), (example.float(),), buf, **kwargs)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # no busy-waiting between calls: the student's steps need those cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            buf.getvalue(), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"images": x})[0])


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def unusable(device: torch.device, logits_only: bool) -> str | None:
    """Why onnxruntime cannot run this teacher here (None: it can)."""
    if device.type != "cpu":
        return "runs on the CPU only"
    if not logits_only:
        return "serves logits only (this teacher feeds feature losses or has train_bn)"
    if not onnxruntime_available():
        return "needs onnxruntime: pip install 'tlkd[export]'"
    return None


def candidates(device: torch.device, logits_only: bool, has_conv: bool) -> list[str]:
    """The runtimes ``auto`` times for a teacher on ``device``."""
    if device.type != "cpu":
        return ["channels_last" if has_conv and device.type == "cuda" else "torch"]
    out = ["torch"] + (["channels_last"] if has_conv else [])
    if unusable(device, logits_only) is None:
        out.append("onnxruntime")
    return out


def time_runtime(
    runtime: str, model: nn.Module, batch: torch.Tensor, dtype: torch.dtype | None
) -> float:
    """Median seconds of one inference forward pass of ``model`` run by ``runtime``."""
    forward = OrtForward(model, batch) if runtime == "onnxruntime" else None
    layout = torch.channels_last if runtime == "channels_last" else torch.contiguous_format
    probe = model.to(memory_format=layout)
    x = batch.contiguous(memory_format=layout)
    times = []
    with torch.inference_mode():
        for i in range(5):
            t0 = time.perf_counter()
            if forward is not None:
                forward(x)
            else:
                with autocast(x.device, dtype):
                    probe(x)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    model.to(memory_format=torch.contiguous_format)
    return sorted(times)[len(times) // 2]


def choose(
    model: nn.Module,
    options: list[str],
    batch_shape: tuple[int, ...],
    dtype: torch.dtype | None,
    cache_dir,
    key_extra: str,
) -> tuple[str, str]:
    """The fastest of ``options`` (a candidate must beat the first by tune.MARGIN) and the
    plan's account of it; remembered in ``cache_dir`` for the same teacher, shapes and machine."""
    if len(options) == 1:
        return options[0], f"{options[0]} (the only candidate here)"
    key = "teacher|" + tune.memo_key(model, batch_shape, False, [key_extra, str(dtype)], options)
    known = tune.remembered(cache_dir)
    if key in known and known[key][0] in options:
        return known[key][0], f"{known[key][0]} (measured before, {tune.TUNE_FILE})"
    # its own generator: a run that measures and one that remembers must draw the same
    # random numbers afterwards (heads and projectors are initialised after this)
    batch = torch.randn(batch_shape, generator=torch.Generator().manual_seed(0))
    timings = []
    with torch.random.fork_rng(devices=[]):  # a measuring run continues like a remembering one
        # one pass on 4 images sizes the batch, so a large teacher is timed in seconds too
        per_image = time_runtime("torch", model, batch[:4], dtype) / 4
        batch = batch[: max(4, min(len(batch), int(tune.STEP_BUDGET_S / max(per_image, 1e-9))))]
        for runtime in options:
            try:
                timings.append((runtime, time_runtime(runtime, model, batch, dtype)))
            except Exception:  # noqa: BLE001 - an export or session that fails is no candidate
                continue
    if not timings or timings[0][0] != options[0]:  # the plain runtime itself failed
        return options[0], f"{options[0]} (the others could not be timed)"
    base = timings[0][1]
    best, best_t = timings[0]
    for runtime, t in timings[1:]:
        if t * tune.MARGIN < base and t < best_t:
            best, best_t = runtime, t
    tune.remember(cache_dir, key, (best, False))
    shown = ", ".join(f"{r} {1000 * t:.0f} ms" for r, t in timings)
    return best, f"{best} (measured a batch of {batch_shape[0]}: {shown})"
