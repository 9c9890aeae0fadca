"""predict: classify image files with a run's best model or an exported ONNX file, with the
preprocessing ``tlkd evaluate`` uses (timm's eval transform from the run's data config)."""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from tlkd.data.decode import ImageLoader
from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError, TlkdError, first_line
from tlkd.run.rundir import CONFIG, WEIGHTS, write_error, write_text

OUT_FORMATS = (".csv", ".jsonl")


@dataclass(frozen=True)
class Preprocess:
    """What turns an image file into the model's input (the keys export records)."""

    image_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        """From the ``preprocess`` entry export records (see export.preprocess_of)."""
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})

    def transform(self) -> Callable:
        """timm's eval transform (resize, centre crop) to a uint8 tensor: the one evaluate
        uses; normalisation happens per batch (:meth:`normalize`)."""
        return create_transform(
            input_size=(3, self.image_size, self.image_size),
            is_training=False,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            use_prefetcher=True,
        )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor([255 * m for m in self.mean]).view(1, -1, 1, 1)
        std = torch.tensor([255 * s for s in self.std]).view(1, -1, 1, 1)
        return images.float().sub_(mean).div_(std)


@dataclass
class Predictor:
    """A model that maps a normalised float batch to logits, its classes and preprocessing."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    classes: list[str]
    preprocess: Preprocess
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


def run_predictor(run: Path) -> Predictor:
    """A run directory's best model, on the device its config asks for (fp32)."""
    from tlkd.engine.device import resolve_device
    from tlkd.recipes.export import load_run_model, preprocess_of

    model, cfg, classes = load_run_model(run)
    preprocess = Preprocess.from_dict(preprocess_of(model, cfg))
    device = resolve_device(cfg.train.device)
    model = model.to(device)

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device)).float().cpu()

    return Predictor(forward, classes, preprocess, f"{run}/{WEIGHTS}", {"device": str(device)})


def onnx_predictor(path: Path) -> Predictor:
    """An ONNX file written by ``tlkd export`` (its ``<file>.json`` gives the classes and the
    preprocessing), run by onnxruntime on the CPU."""
    meta_file = path.with_suffix(path.suffix + ".json")
    try:
        meta = json.loads(meta_file.read_text())
        preprocess = Preprocess.from_dict(meta["preprocess"])
        classes = list(meta["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            None,
            f"{path.name} needs {meta_file.name} beside it with its classes and preprocessing, "
            "as `tlkd export` writes it (export the run again with this tlkd)",
        ) from None
    try:
        import onnxruntime as ort
    except ImportError:
        raise TlkdError(
            "predicting with an ONNX file needs onnxruntime: pip install 'tlkd[export]'"
        ) from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime's errors for a file it cannot load
        raise ConfigError(None, f"onnxruntime cannot load {path.name}: {first_line(err)}") from None
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        try:
            out = session.run(None, {name: x.numpy()})[0]
        except Exception as err:  # noqa: BLE001 - e.g. a model exported for a fixed batch
            raise TlkdError(f"onnxruntime failed on {path.name}: {first_line(err)}") from None
        return torch.from_numpy(np.asarray(out)).float()

    return Predictor(forward, classes, preprocess, str(path), {"device": "cpu (onnxruntime)"})


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Files as given, folders searched recursively for image files, and glob patterns
    (``**`` included), in the order given, each file once."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            hits = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
            )
        elif path.is_file():
            hits = [path]
        else:
            hits = sorted(
                Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file()
            )
        if not hits:
            raise ConfigError(None, f"no image files found at {item}")
        found += hits
    seen: set[Path] = set()
    unique = []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


class _Files(Dataset):
    """Image files through the eval transform; an unreadable file gives None (reported)."""

    def __init__(self, files: list[Path], transform: Callable) -> None:
        self.files, self.transform = files, transform
        # whole decodes (simplejpeg where it can): the pixels tlkd evaluate scores
        self.load = ImageLoader()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.transform(self.load(str(self.files[i]))), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            return i, None, f"{type(err).__name__}: {err}"  # what PIL raises for bad files


def _collate(batch: list) -> list:
    return batch


def predict(
    target: str | Path,
    inputs: Sequence[str],
    out: str | Path | None = None,
    topk: int = 5,
    batch_size: int = 64,
    workers: int | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Classify ``inputs`` with ``target`` (a run directory or an exported .onnx file); write
    ``out`` (.csv or .jsonl) if given; returns rows, the unreadable files and counts."""
    reporter = reporter or Reporter()
    if topk < 1:
        raise ConfigError("--topk", f"must be at least 1, got {topk}")
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be at least 1, got {batch_size}")
    out_path = Path(out).expanduser() if out else None
    if out_path is not None and out_path.suffix.lower() not in OUT_FORMATS:
        raise ConfigError("--out", f"expected a .csv or .jsonl file, got {out_path.name}")
    path = Path(target).expanduser().resolve()
    if path.is_dir():
        if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
            raise ConfigError(
                None, f"{path} is not a tlkd run directory (needs {CONFIG} and {WEIGHTS})"
            )
        files = collect_images(inputs)  # before the model: a typo fails fast
        predictor = run_predictor(path)
    elif path.is_file() and path.suffix == ".onnx":
        files = collect_images(inputs)
        predictor = onnx_predictor(path)
    else:
        raise ConfigError(None, f"no such run directory or .onnx file: {target}")
    k = min(topk, len(predictor.classes))
    from tlkd.data.pipeline import default_workers

    loader = DataLoader(
        _Files(files, predictor.preprocess.transform()),
        batch_size=batch_size,
        num_workers=default_workers() if workers is None else workers,
        collate_fn=_collate,
    )
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    for batch in loader:
        good = [(i, x) for i, x, err in batch if err is None]
        bad += [{"path": str(files[i]), "error": err} for i, _, err in batch if err is not None]
        if not good:
            continue
        images = predictor.preprocess.normalize(torch.stack([x for _, x in good]))
        probs = predictor.forward(images).softmax(dim=1)
        top_p, top_i = probs.topk(k, dim=1)
        for (i, _), p, idx in zip(good, top_p.tolist(), top_i.tolist(), strict=True):
            rows.append(
                {
                    "path": str(files[i]),
                    "class": predictor.classes[idx[0]],
                    "probability": p[0],
                    "topk": [
                        {"class": predictor.classes[c], "probability": q}
                        for c, q in zip(idx, p, strict=True)
                    ],
                }
            )
    result = {
        "model": predictor.source,
        "images": len(files),
        "predicted": len(rows),
        "unreadable": bad,
        "rows": rows,
        **predictor.extra,
    }
    if out_path is not None:
        _write(out_path, rows)
        result["out"] = str(out_path)
    _print(result, reporter)
    if not rows:
        first = bad[0]
        raise TlkdError(
            f"none of the {len(files)} images could be read "
            f"(e.g. {first['path']}: {first['error']})"
        )
    return result


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    if path.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "class", "probability", "topk"])
        for r in rows:
            topk = ";".join(f"{t['class']}:{t['probability']:.6f}" for t in r["topk"])
            writer.writerow([r["path"], r["class"], f"{r['probability']:.6f}", topk])
        text = buf.getvalue()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path, err) from None
    write_text(path, text)


SHOWN = 20  # rows printed on the terminal; the file holds all


def _print(result: dict[str, Any], reporter: Reporter) -> None:
    if reporter.quiet:
        return
    from rich.table import Table

    rows = result["rows"]
    table = Table(title=f"{result['predicted']:,} of {result['images']:,} images")
    for col in ("image", "class", "probability", "next"):
        table.add_column(col)
    for r in rows[:SHOWN]:
        nxt = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["topk"][1:3])
        table.add_row(r["path"], r["class"], f"{100 * r['probability']:.1f}%", nxt)
    reporter.console.print(table)
    if len(rows) > SHOWN:
        reporter.print(
            f"... {len(rows) - SHOWN:,} more rows"
            + (" (all in the file)" if "out" in result else " (--out FILE.csv keeps all)")
        )
    if result["unreadable"]:
        first = result["unreadable"][0]
        reporter.print(
            f"skipped {len(result['unreadable'])} unreadable images, "
            f"e.g. {first['path']} ({first['error']})"
        )
    if "out" in result:
        reporter.print(f"wrote {result['out']}")
