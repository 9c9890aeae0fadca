"""Out-of-the-box accuracy: tlkd's defaults against no augmentation, timm's ImageNet recipe and
the tuned shipped config, on datasets the defaults were not tuned on.

``python -m bench.defaults [--seeds 0 1] [--only NAME ...]`` builds five image folders from
the CIFAR-10 JPEGs of ../shared/data and the embedded digits (under ~/.cache/tlkd-bench/defaults),
runs ``tlkd finetune`` for every dataset x setting x seed, one run at a time, and writes
bench/results/defaults.json (rows are kept across invocations: finished runs are not rerun).
Each run is a config with nothing set but the data, the epochs and what the row changes:
the model is tlkd's default (resnet18 from scratch: no weights can be downloaded here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bench.__main__ import cifar
from tlkd.config.loader import deep_merge, effective, load_config

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("TLKD_BENCH_DIR", "~/.cache/tlkd-bench")).expanduser() / "defaults"
OUT = REPO / "bench" / "results" / "defaults.json"

# name -> (train images per class, epochs, how the images are made)
DATASETS: dict[str, tuple[int, int, str]] = {
    "digits28": (0, 8, "the embedded UCI digits as a folder of 28 px PNGs (1,442 / 355)"),
    "cifar32": (100, 8, "CIFAR-10, 100 train images per class, 32 px"),
    "cifar-grey": (100, 8, "the same images in greyscale"),
    "cifar-20pc": (20, 30, "CIFAR-10, 20 train images per class, 32 px"),
    "cifar96": (30, 8, "CIFAR-10, 30 per class, upsampled to 96 px (stand-in for photos)"),
}
VAL_PER_CLASS = 100  # CIFAR test images per class in every CIFAR val set (1,000)
STRONG = {"policy": "strong"}  # timm's ImageNet recipe
# the shipped configs' own settings, where a shipped config fits the data
TUNED = {
    "digits28": yaml.safe_load((REPO / "configs/demo.yaml").read_text()),
    "cifar32": yaml.safe_load((REPO / "configs/cifar10-distill/common.yaml").read_text()),
    "cifar-grey": yaml.safe_load((REPO / "configs/cifar10-distill/common.yaml").read_text()),
}


def build(name: str) -> tuple[Path, Path]:
    """The dataset's train and val folders (made once)."""
    root = WORK / "data" / name
    if (root / "done").is_file():
        return root / "train", root / "val"
    per_class = DATASETS[name][0]
    if name == "digits28":
        with np.load(REPO / "tlkd/data/embedded/digits.npz") as arrays:
            for split, key in (("train", "train"), ("val", "val")):
                for i, (x, y) in enumerate(
                    zip(arrays[f"{key}_x"], arrays[f"{key}_y"], strict=True)
                ):
                    folder = root / split / str(int(y))
                    folder.mkdir(parents=True, exist_ok=True)
                    img = Image.fromarray(x).resize((28, 28), Image.BILINEAR)
                    img.save(folder / f"{i:05d}.png")
    else:
        src = cifar()
        for split, n in (("train", per_class), ("val", VAL_PER_CLASS)):
            for cls in sorted(
                p for p in (src / ("train" if split == "train" else "test")).iterdir()
            ):
                folder = root / split / cls.name
                folder.mkdir(parents=True, exist_ok=True)
                for f in sorted(cls.iterdir())[:n]:
                    img = Image.open(f).convert("RGB")
                    if name == "cifar-grey":
                        img = img.convert("L")
                    if name == "cifar96":
                        img = img.resize((96, 96), Image.BICUBIC)
                    img.save(folder / f.name, quality=95)
    (root / "done").write_text("")
    return root / "train", root / "val"


def settings(name: str) -> dict[str, dict]:
    """Row name -> the config keys the row sets (beyond data and epochs)."""
    rows = {
        "defaults": {},
        "none": {"data": {"augment": {"policy": "none"}}},
        "timm-imagenet": {"data": {"augment": STRONG}},
    }
    if name in TUNED:
        t = TUNED[name]
        rows["tuned"] = {
            "data": {"augment": t["data"]["augment"], "image_size": t["data"]["image_size"]},
            "train": {k: t["train"][k] for k in ("optimizer", "scheduler", "batch_size")},
        }
    return rows


# Runs of rows that leave the optimizer to tlkd's defaults are tagged with the defaults'
# version, so a change of the rules reruns them (the tuned rows set everything themselves).
DEFAULTS_VERSION = 2  # 2: learning rate and warm-up by optimizer family, start and batch


def current(run: dict) -> bool:
    return run["row"] == "tuned" or run.get("defaults_version") == DEFAULTS_VERSION


def run_one(name: str, row: str, seed: int) -> dict:
    train, val = build(name)
    tag = "" if row == "tuned" else f"-v{DEFAULTS_VERSION}"
    cfg = {
        "experiment": f"{name}-{row}-s{seed}{tag}",
        "output_dir": str(WORK / "runs"),
        "seed": seed,
        "data": {"train": str(train), "val": str(val)},
        "train": {"epochs": DATASETS[name][1], "val_every": 1000},
    }
    cfg = deep_merge(cfg, settings(name)[row])
    path = WORK / "configs" / f"{cfg['experiment']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    done = Path(cfg["output_dir"]) / cfg["experiment"]
    if (done / "summary.json").is_file() and "finished" in (done / "summary.json").read_text():
        return collect(name, row, seed, done, None)  # finished by an earlier invocation
    shutil.rmtree(done, ignore_errors=True)  # an interrupted run starts again
    proc = subprocess.run(
        [sys.executable, "-m", "tlkd", "finetune", str(path), "-q"],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{cfg['experiment']} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    # -q prints one line: "<run dir>  best val top-1 X%"
    run_dir = proc.stdout.strip().splitlines()[-1].split("  ")[0]
    return collect(name, row, seed, Path(run_dir), round(time.perf_counter() - t0, 1))


def collect(name: str, row: str, seed: int, run_dir: Path, wall_s: float | None) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    # what the run used: the config as given with the values tlkd chose applied
    saved = effective(load_config(run_dir / "config.yaml")).model_dump(mode="json")
    return {
        "dataset": name,
        "row": row,
        "seed": seed,
        "defaults_version": None if row == "tuned" else DEFAULTS_VERSION,
        "final_val_top1": summary["final_val_top1"],
        "augment": saved["data"]["augment"],
        "image_size": saved["data"]["image_size"],
        "lr": saved["train"]["optimizer"]["lr"],
        "warmup_epochs": saved["train"]["scheduler"]["warmup_epochs"],
        "weight_decay": saved["train"]["optimizer"]["weight_decay"],
        "precision": summary["precision"],
        "defaults_chosen": summary.get("defaults_chosen"),
        "wall_s": wall_s if wall_s is not None else summary["wall_time_s"],
    }


def table(runs: list[dict]) -> list[dict]:
    out = []
    for name in DATASETS:
        for row in settings(name):
            vals = [r["final_val_top1"] for r in runs if (r["dataset"], r["row"]) == (name, row)]
            if vals:
                out.append({
                    "dataset": name, "row": row, "n": len(vals),
                    "mean": round(statistics.mean(vals), 2),
                    "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else None,
                    "per_seed": vals,
                })  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.defaults", description=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    args = p.parse_args()
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": []}
    stale = [r for r in data["runs"] if not current(r)]
    if stale:  # kept, apart, for the record of what the earlier rules gave
        data.setdefault("superseded", []).extend(stale)
        data["runs"] = [r for r in data["runs"] if current(r)]
        data["superseded_note"] = (
            "rows measured under earlier defaults (v1: AdamW lr 1e-3 and no warm-up whatever "
            "the start and batch); rerun under the current rules"
        )
    done = {(r["dataset"], r["row"], r["seed"]) for r in data["runs"]}
    for name in args.only:
        for row in settings(name):
            for seed in args.seeds:
                if (name, row, seed) in done:
                    continue
                result = run_one(name, row, seed)
                print(json.dumps(result), flush=True)
                data["runs"].append(result)
                data.update(
                    command="python -m bench.defaults",
                    machine={"cpu": platform.machine(), "cores": os.cpu_count()},
                    datasets={k: v[2] + f", {v[1]} epochs" for k, v in DATASETS.items()},
                    date=time.strftime("%Y-%m-%d"),
                    table=table(data["runs"]),
                )
                OUT.write_text(json.dumps(data, indent=1))
    for row in table(data["runs"]):
        print(f"{row['dataset']:<11} {row['row']:<14} {row['mean']:6.2f} ± {row['std']}")


if __name__ == "__main__":
    main()
