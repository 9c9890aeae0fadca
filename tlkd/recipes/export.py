"""export: write a run's best model for deployment (ONNX or TorchScript), checked by running
the exported file on a batch and comparing its outputs with PyTorch's."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_model_data_config

from tlkd.config.loader import effective, load_config, with_values
from tlkd.errors import ConfigError, TlkdError
from tlkd.models.factory import build_model
from tlkd.run.rundir import CONFIG, SUMMARY, WEIGHTS, write_error, write_json

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


def load_run_model(run: Path) -> tuple[torch.nn.Module, Any, list[str]]:
    """A run directory's best model (CPU, eval mode), its config and classes."""
    for name in (CONFIG, WEIGHTS, SUMMARY):
        if not (run / name).is_file():
            raise ConfigError(None, f"{run} is not a tlkd run directory (no {name})")
    cfg = with_values(effective(load_config(run / CONFIG)), {"model.pretrained": str(run)})
    classes = json.loads((run / SUMMARY).read_text())["classes"]
    model, _ = build_model(cfg.model, len(classes), classes)
    return model.eval(), cfg, classes


def preprocess_of(model: torch.nn.Module, cfg: Any) -> dict[str, Any]:
    """The input pipeline of a run's model: eval resize/crop and normalisation."""
    data_cfg = resolve_model_data_config(model)
    return {
        "image_size": int(cfg.data.image_size),
        "crop_pct": float(cfg.data.crop_pct),
        "interpolation": str(cfg.data.interpolation),
        "mean": [float(v) for v in data_cfg["mean"]],
        "std": [float(v) for v in data_cfg["std"]],
    }


def export(
    run_dir: str | Path,
    fmt: str,
    output: str | Path | None = None,
    atol: float = 1e-4,
    quantize: str | None = None,
    calibration: int = 256,
    max_drop: float = 1.0,
) -> dict[str, Any]:
    """Write the run's best model as ``fmt``, verified against PyTorch; with ``quantize:
    int8`` (ONNX) also an int8 model, scored against the fp32 one (tlkd/recipes/quantize.py)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if quantize is not None and quantize != "int8":
        raise ConfigError("--quantize", f"expected int8, got {quantize!r}")
    if quantize is not None and fmt != "onnx":
        raise ConfigError("--quantize", "int8 quantization is for --format onnx")
    run = Path(run_dir).expanduser().resolve()
    model, cfg, classes = load_run_model(run)
    size = cfg.data.image_size
    out = Path(output).expanduser().resolve() if output else run / FORMATS[fmt]
    example = torch.randn(2, 3, size, size)
    check = torch.randn(5, 3, size, size)  # another batch size: the batch axis is dynamic
    with torch.inference_mode():
        expected = model(check)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "onnx":
            got = _onnx(model, example, check, out)
        else:
            got = _torchscript(model, example, check, out)
    except OSError as err:  # a full disk, a folder that cannot be written: one line
        raise write_error(out, err) from None
    diff = None if got is None else (got - expected).abs().max().item()
    report = {
        "format": fmt,
        "file": str(out),
        "input": [None, 3, size, size],
        "classes": classes,
        "max_abs_diff": diff,
        "verified": diff is not None and diff <= atol,
        "preprocess": preprocess_of(model, cfg),  # what `tlkd predict FILE.onnx` applies
    }
    if diff is not None and diff > atol:
        raise TlkdError(f"exported {fmt} outputs differ from PyTorch's by {diff:.2e} (> {atol})")
    int8 = None
    if quantize == "int8":
        from tlkd.recipes.predict import Preprocess
        from tlkd.recipes.quantize import quantize_int8

        preprocess = Preprocess.from_dict(report["preprocess"])
        int8 = quantize_int8(out, cfg, preprocess, calibration, max_drop)
        report["int8"] = int8
        if int8["kept"]:  # its own sidecar: tlkd predict model.int8.onnx reads it
            int8_file = Path(int8["file"])
            sidecar = {**report, "file": str(int8_file), "max_abs_diff": None, "verified": None}
            write_json(int8_file.with_suffix(".onnx.json"), sidecar)
    write_json(out.with_suffix(out.suffix + ".json"), report)
    if int8 is not None and not int8["kept"]:
        from tlkd.recipes.quantize import refusal

        raise refusal(int8)
    return report


def _onnx(model, example, check, out: Path) -> torch.Tensor | None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise TlkdError(
            "ONNX export needs onnx and onnxscript: pip install 'tlkd[export]'"
        ) from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    with quiet_torch_deprecations():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        program.save(str(out))
    try:
        import onnxruntime as ort
    except ImportError:
        return None  # written but not verified
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": check.numpy()})[0])


# torch's notices that an exporter is deprecated: "`torch.jit.trace` is deprecated. ..."
_TORCH_DEPRECATION = r"[`'\"]?torch\.(jit|onnx|export)\b.*(deprecated|will be removed)"


@contextlib.contextmanager
def quiet_torch_deprecations() -> Iterator[None]:
    """Hide torch's own deprecation notices about the exporters it runs (``torch.jit.trace``
    is deprecated ...): TorchScript is still a valid deployment format, and the notice says
    nothing the user can act on. Other warnings still show."""
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", message=_TORCH_DEPRECATION, category=category)
        yield


def _torchscript(model, example, check, out: Path) -> torch.Tensor:
    with quiet_torch_deprecations():
        with torch.inference_mode():
            traced = torch.jit.trace(model, example)
        traced.save(str(out))
        loaded = torch.jit.load(str(out))
        with torch.inference_mode():
            return loaded(check)
