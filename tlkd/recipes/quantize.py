"""int8 ONNX: onnxruntime's static quantization of an exported model, calibrated on the run's
training images, then scored against the fp32 file on the run's val images (top-1 and batch-1
latency, both through onnxruntime on the CPU). Written by hand: only the glue; the
quantization itself is onnxruntime's (``quantize_static``, QDQ, per-channel int8 weights)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlkd.config.schema import Config
from tlkd.data.datasets import LabeledImages, build_splits
from tlkd.errors import ConfigError, TlkdError, first_line
from tlkd.recipes.predict import Preprocess

INT8_SUFFIX = ".int8.onnx"


def _batches(
    images: LabeledImages, indices: list[int], preprocess: Preprocess, batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Normalised float32 batches (and labels) of ``images[indices]``, as evaluate's input."""
    transform = preprocess.transform()
    for start in range(0, len(indices), batch):
        items = [images[i] for i in indices[start : start + batch]]
        x = preprocess.normalize(torch.stack([transform(img) for img, _ in items]))
        yield x.numpy(), np.array([y for _, y in items])


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _top1(sessions: list[Any], batches: Iterator[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """Val top-1 (%) of each session, one pass over the batches (never all in memory)."""
    names = [s.get_inputs()[0].name for s in sessions]
    correct, total = [0] * len(sessions), 0
    for x, y in batches:
        for i, (session, name) in enumerate(zip(sessions, names, strict=True)):
            correct[i] += int((session.run(None, {name: x})[0].argmax(axis=1) == y).sum())
        total += len(y)
    return [100.0 * c / max(total, 1) for c in correct]


def _latency_ms(session: Any, size: int, runs: int = 50) -> float:
    """Median batch-1 latency after 5 untimed runs (ms)."""
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    times = []
    for i in range(runs + 5):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def end_layers(onnx_file: Path) -> list[str]:
    """The names of the first and the last weight layer (Conv, Gemm, MatMul) in graph order:
    the stem, which sees raw pixels, and the classifier. Kept in fp32, as is common practice
    for post-training quantization: measured on a CIFAR resnet20 (docs/performance.md), int8
    everywhere lost 2.6 points of val top-1, int8 but these two 0.1."""
    import onnx

    graph = onnx.load(str(onnx_file)).graph
    names = [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    return sorted({names[0], names[-1]}) if names else []


def quantize_int8(
    fp32_file: Path,
    cfg: Config,
    preprocess: Preprocess,
    calibration: int = 256,
    max_drop: float = 1.0,
    batch: int = 64,
) -> dict[str, Any]:
    """Write ``<name>.int8.onnx`` beside ``fp32_file`` and return its report; refuse (the file
    removed, TlkdError) when its val top-1 is more than ``max_drop`` points below fp32's."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise TlkdError("int8 export needs onnxruntime: pip install 'tlkd[export]'") from None
    if max_drop < 0:
        raise ConfigError("--max-drop", f"must be at least 0 points, got {max_drop:g}")
    if calibration < 1:
        raise ConfigError("--calibration", f"must be at least 1 image, got {calibration}")
    from tlkd.recipes.build import subset_seed

    splits = build_splits(cfg.data, subset_seed(cfg))  # the run's own train/val split
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise ConfigError("data", "int8 calibration and scoring need the run's train and val data")
    # calibration images: a seeded sample of the training split, evaluate's preprocessing
    pick = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(cfg.seed))
    calib = [x for x, _ in _batches(splits.train, pick[:calibration].tolist(), preprocess, batch)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {"images": x}

    out = fp32_file.with_name(fp32_file.name.removesuffix(".onnx") + INT8_SUFFIX)
    prepared = out.with_name(f".{out.name}.prep.onnx")
    t0 = time.perf_counter()
    try:  # onnxruntime's failures (an operator it cannot quantize, ...) become one line
        quant_pre_process(str(fp32_file), str(prepared))  # shape inference, folding (ORT's)
        fp32_nodes = end_layers(prepared)
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            nodes_to_exclude=fp32_nodes,
        )
    except Exception as err:  # noqa: BLE001 - onnx/onnxruntime raise many kinds
        with contextlib.suppress(OSError):
            out.unlink()
        raise TlkdError(f"int8 quantization failed: {first_line(err)}") from None
    finally:
        with contextlib.suppress(OSError):
            prepared.unlink()
    quantize_s = time.perf_counter() - t0
    fp32, int8 = _session(fp32_file), _session(out)
    val = _batches(splits.val, list(range(len(splits.val))), preprocess, batch)
    fp32_top1, int8_top1 = _top1([fp32, int8], val)
    report = {
        "file": str(out),
        "calibration_images": min(calibration, len(splits.train)),
        "val_images": len(splits.val),
        "fp32_top1": fp32_top1,
        "int8_top1": int8_top1,
        "fp32_latency_ms": _latency_ms(fp32, preprocess.image_size),
        "int8_latency_ms": _latency_ms(int8, preprocess.image_size),
        "fp32_mb": fp32_file.stat().st_size / 2**20,
        "int8_mb": out.stat().st_size / 2**20,
        "quantize_s": quantize_s,
        "max_drop": max_drop,
        "method": "onnxruntime quantize_static: QDQ, per-channel int8 weights, uint8 "
        "activations, MinMax calibration; the first and last layers kept in fp32",
        "fp32_layers": fp32_nodes,
    }
    report["drop"] = report["fp32_top1"] - report["int8_top1"]
    report["kept"] = report["drop"] <= max_drop
    if not report["kept"]:
        out.unlink()
    return report


def refusal(report: dict[str, Any]) -> TlkdError:
    """The error of an int8 model that lost more than ``max_drop`` points."""
    return TlkdError(
        f"int8 val top-1 {report['int8_top1']:.2f}% is {report['drop']:.2f} points below "
        f"fp32's {report['fp32_top1']:.2f}% (more than --max-drop {report['max_drop']:g}); "
        f"{Path(report['file']).name} not kept (calibrate on more images with --calibration, "
        "or allow a larger drop)"
    )
