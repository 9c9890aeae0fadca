"""Does ``train.precision: auto`` cost accuracy? fp32 against auto over 3 seeds, on a
from-scratch CIFAR ResNet-20 and on a distillation run (resnet56 teacher -> resnet20).

``python -m bench.precision`` uses the cifar32 folders of ``python -m bench.defaults`` (1,000
train images, 1,000 test images), trains the teacher once (fp32), then every
{scratch, kd} x {fp32, auto} x seed run one at a time, and writes bench/results/precision.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.defaults import WORK, build

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "precision.json"
SEEDS = (0, 1, 2)
EPOCHS = 15
# auto picks fp32 where bf16 is not faster (this AMD EPYC): bf16 forced shows what it would cost
RUNS = [("scratch", "fp32"), ("scratch", "auto"), ("kd", "fp32"), ("scratch", "bf16"),
        ("kd", "auto")]  # fmt: skip


def tlkd(mode: str, cfg: dict) -> dict:
    path = WORK / "configs" / f"{cfg['experiment']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tlkd", mode, str(path), "-q"],
        capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=REPO,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{cfg['experiment']} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    # -q prints one line: "<run dir>  best val top-1 X%"
    run_dir = proc.stdout.strip().splitlines()[-1].split("  ")[0]
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return {
        "run_dir": run_dir,
        "final_val_top1": summary["final_val_top1"],
        "precision": summary["precision"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def base(name: str, seed: int, train: Path, val: Path, model: str) -> dict:
    return {
        "experiment": name,
        "output_dir": str(WORK / "runs"),
        "seed": seed,
        "model": {"name": model},
        "data": {"train": str(train), "val": str(val)},
        "train": {"epochs": EPOCHS, "val_every": 1000},
    }


def main() -> None:
    train, val = build("cifar32")
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": {}}
    runs = data["runs"]
    if "teacher" not in runs:
        cfg = base("prec-teacher-resnet56", 0, train, val, "resnet56")
        cfg["train"]["precision"] = "fp32"
        runs["teacher"] = tlkd("finetune", cfg)
    teacher = runs["teacher"]["run_dir"]
    for kind, precision in RUNS:
        for seed in SEEDS:
            key = f"{kind}-{precision}-s{seed}"
            if key in runs:
                continue
            cfg = base(f"prec-{key}", seed, train, val, "resnet20")
            cfg["train"]["precision"] = precision
            mode = "finetune"
            if kind == "kd":
                mode = "distill"
                cfg["teacher"] = {"name": "resnet56", "pretrained": teacher}
            runs[key] = tlkd(mode, cfg)
            print(key, json.dumps(runs[key]), flush=True)
            OUT.write_text(json.dumps(data, indent=1))
    summary = {}
    for kind, precision in RUNS:
        if all(f"{kind}-{precision}-s{s}" in runs for s in SEEDS):
            vals = [runs[f"{kind}-{precision}-s{s}"]["final_val_top1"] for s in SEEDS]
            chosen = {runs[f"{kind}-{precision}-s{s}"]["precision"] for s in SEEDS}
            summary[f"{kind}-{precision}"] = {
                "mean": round(statistics.mean(vals), 2),
                "std": round(statistics.stdev(vals), 2),
                "per_seed": vals,
                "ran_as": sorted(chosen),
            }
            print(kind, precision, summary[f"{kind}-{precision}"])
    data.update(
        summary=summary,
        command="python -m bench.precision",
        setup=f"cifar32 folders (1,000 train / 1,000 test), {EPOCHS} epochs, tlkd defaults",
        machine={"cpu": platform.machine(), "cores": os.cpu_count()},
        date=time.strftime("%Y-%m-%d"),
    )
    OUT.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
