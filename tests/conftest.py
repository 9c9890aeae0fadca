"""Shared fixtures: tiny coloured-square image folders, YAML config files, CLI runners.

Everything here is offline and small: the models are timm's tiny ``test_*`` architectures at
16 px, the data are a few PNGs written into tmp_path, and training runs 1-4 epochs on the CPU.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub/timm: never touch the network, and never find
# weights that happen to be cached on this machine.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="tlkd-tests-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
# the in-memory data path's decoded-image cache (and the teacher cache): per test session
os.environ["TLKD_CACHE_DIR"] = tempfile.mkdtemp(prefix="tlkd-tests-cache-")
atexit.register(shutil.rmtree, os.environ["TLKD_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

# One thread: the suite shares a small machine, and thread contention makes tiny models slower.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# Class name -> RGB colour. Every image of a class is that colour plus noise, so a model can
# learn the class from colour alone; the noise makes every image unique.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "cyan": (30, 210, 220),
    "magenta": (210, 30, 210),
}

MODEL = "test_resnet"  # timm's tiny ResNet (~0.37M parameters, with BatchNorm)
IMAGE_SIZE = 16


def write_images(
    root: Path,
    classes: list[str] | tuple[str, ...] = ("red", "green", "blue"),
    per_class: int = 8,
    size: int = IMAGE_SIZE,
    seed: int = 0,
    noise: int = 30,
) -> Path:
    """Write ``root/<class>/<i>.png`` coloured squares and return ``root``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(COLOURS[name], dtype=np.int16)
        for i in range(per_class):
            pixels = colour + rng.integers(-noise, noise + 1, size=(size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def make_images(tmp_path):
    """``make_images(name, classes=..., per_class=..., seed=...)`` -> tmp_path/name."""
    counter = iter(range(1, 10_000))

    def make(name: str = "images", **kwargs) -> Path:
        kwargs.setdefault("seed", next(counter))
        return write_images(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def squares(make_images):
    """3 classes: 8 train and 4 val images each."""
    return make_images("train", per_class=8), make_images("val", per_class=4)


def small_config(
    tmp_path: Path, train_dir: Path | None, val_dir: Path | None = None, **sections
) -> dict:
    """A config dict for a fast CPU run of the tiny model; ``sections`` deep-update it."""
    cfg = {
        "experiment": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"name": MODEL, "pretrained": False},
        "data": {
            "image_size": IMAGE_SIZE,
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "num_workers": 0,
            "augment": {
                "crop_mode": "rkrr",
                "scale": [1.0, 1.0],
                "hflip": 0.0,
                "color_jitter": 0.0,
            },
        },
        "train": {
            "epochs": 2,
            "batch_size": 8,
            "device": "cpu",
            "precision": "fp32",  # fixed: "auto" times candidates (tests/test_tune.py)
            "channels_last": False,
            "log_every": 1000,
            "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
            "scheduler": {"name": "none"},
        },
    }
    if train_dir is not None:
        cfg["data"]["train"] = str(train_dir)
    if val_dir is not None:
        cfg["data"]["val"] = str(val_dir)
    return _deep_update(cfg, sections)


def _deep_update(base: dict, over: dict) -> dict:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture
def write_config(tmp_path):
    """``write_config(data, name="exp.yaml", folder=tmp_path)`` -> the YAML file's path.
    ``data`` may be a dict (dumped as YAML) or raw YAML text."""

    def write(data: dict | str, name: str = "exp.yaml", folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def tiny_config(tmp_path, squares, write_config):
    """``tiny_config(**sections)`` -> path of a small_config YAML over the ``squares`` data."""
    train, val = squares

    def make(name: str = "exp.yaml", **sections) -> Path:
        return write_config(small_config(tmp_path, train, val, **sections), name)

    return make


@pytest.fixture
def cli():
    """In-process ``tlkd`` (typer's CliRunner): ``cli("finetune", path, ...)`` -> Result."""
    from tlkd.cli import app

    runner = CliRunner()

    def invoke(*args: str | Path):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def tlkd_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


@pytest.fixture
def run_tlkd(tmp_path):
    """``python -m tlkd ...`` in a subprocess (real exit codes and stderr), run in tmp_path."""

    def run(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tlkd", *map(str, args)],
            cwd=tmp_path,
            env=tlkd_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """``tlkd ...`` in this process (typer's CliRunner), in tmp_path, returning what
    ``run_tlkd`` returns (``returncode``, ``stdout``, ``stderr``; an uncaught exception's
    traceback is appended to stderr, as a real process would print it). For tests of exit
    codes and messages that need no real process: starting one costs ~6 s of imports."""
    import traceback

    from tlkd.cli import app

    def run(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(app, [str(a) for a in args])
        stderr = result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            stderr += "".join(traceback.format_exception(result.exception))
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)

    return run


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line a failed command must print on stderr (asserted)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    return lines[0]


class TrainedRun:
    """A finished ``tlkd finetune`` run shared by the tests that only read it."""

    def __init__(self, root: Path, train: Path, val: Path, config: Path, output: str) -> None:
        self.root, self.train, self.val, self.config, self.output = (
            root,
            train,
            val,
            config,
            output,
        )
        self.dir = root / "runs" / "shared"
        self.classes = ["blue", "green", "red"]  # ImageFolder order: sorted folder names


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """2 epochs of the tiny model on 3 classes x 8 images (val: 3 x 4), via ``tlkd finetune``.
    Tests may add files to its folder (eval.json) but must not change the run's own files."""
    from tlkd.cli import app

    root = tmp_path_factory.mktemp("shared")
    train = write_images(root / "train", per_class=8, seed=101)
    val = write_images(root / "val", per_class=4, seed=102)
    cfg = small_config(root, train, val, experiment="shared")
    config = root / "exp.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    result = CliRunner().invoke(app, ["finetune", str(config)])
    assert result.exit_code == 0, result.output
    run = TrainedRun(root, train, val, config, result.output)
    assert run.dir.is_dir(), result.output
    return run


def timm_weights(path: Path, name: str, num_classes: int, seed: int = 0) -> Path:
    """A weights file of a freshly initialised timm model (seeded): a teacher for tests."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def interrupted_and_resumed(run_cli, monkeypatch, mode: str, config, at: int, run: Path) -> Path:
    """``tlkd mode config`` into ``run``, stopped after optimizer update ``at`` by SIGTERM's
    path (exit 143, a partial checkpoint), then ``--resume``d to its end; returns ``run``."""
    from tlkd.engine.trainer import Trainer

    step, stop = Trainer._optimizer_step, {"at": at}

    def stop_after(self):
        step(self)
        if self.updates == stop["at"]:
            self._signals.received = "SIGTERM"

    monkeypatch.setattr(Trainer, "_optimizer_step", stop_after)
    proc = run_cli(mode, config, f"experiment={run.name}", f"output_dir={run.parent}")
    assert proc.returncode == 143, proc.stdout + proc.stderr
    stop["at"] = None
    proc = run_cli(mode, "--resume", run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run
