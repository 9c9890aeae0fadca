"""tlkd's benchmark harness: ``python -m bench quick`` (see bench/README.md).

Every comparison runs its sides as separate processes, one after another, on the same data,
repeats each a few times and reports the median with min-max; ratios are what carry over
between machines, absolute images/s on a shared machine drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("TLKD_CIFAR", "~/.cache/tlkd-data/cifar10")).expanduser()
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
WORK = Path(os.environ.get("TLKD_BENCH_DIR", "~/.cache/tlkd-bench")).expanduser()
TD_VENV = WORK / "td-venv"
TD_PIN = ["torch==2.14.1", "torchvision==0.29.1", "torchdistill==1.1.5", "timm==1.0.31"]
PY = sys.executable


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- data and processes


def cifar() -> Path:
    if not (CIFAR / "train").is_dir():
        log(f"unpacking {CIFAR_TAR} -> {CIFAR.parent}")
        CIFAR.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xzf", str(CIFAR_TAR), "-C", str(CIFAR.parent)], check=True)
    return CIFAR


def subset(split: str, per_class: int) -> Path:
    """A fixed subset of CIFAR-10 (the first ``per_class`` files of each class, sorted), as a
    folder of symlinks, so every tool reads exactly the same images."""
    out = WORK / "data" / f"{split}-{per_class}"
    if out.is_dir():
        return out
    tmp = out.with_suffix(".tmp")
    for cls in sorted(p for p in (cifar() / split).iterdir() if p.is_dir()):
        (tmp / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir())[:per_class]:
            (tmp / cls.name / f.name).symlink_to(f)
    tmp.rename(out)
    return out


def run(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def last_json(out: str) -> dict:
    return json.loads([x for x in out.splitlines() if x.startswith("{")][-1])


def handloop(mode: str, *args: str, env: dict[str, str] | None = None) -> dict:
    return last_json(run([PY, "-m", "bench.handloop", mode, *args], env, REPO))


def tlkd_config(tmp: Path, name: str, train: Path, val: Path, **over) -> dict:
    cfg = {
        "experiment": name,
        "output_dir": str(tmp / "runs"),
        "seed": 0,
        "model": {"name": "resnet20"},
        "data": {
            "train": str(train),
            "val": str(val),
            "image_size": 32,
            "crop_pct": 1.0,
            "num_workers": 2,
            "cache_dir": str(WORK / "cache"),
            "augment": {"crop_mode": "rrc", "scale": [0.7, 1.0], "hflip": 0.5, "color_jitter": 0.0},
        },
        "train": {
            "epochs": 1,
            "batch_size": 128,
            "precision": "fp32",
            "channels_last": False,
            "log_every": 100000,
            "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
            "scheduler": {"name": "none"},
        },
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def tlkd(
    mode: str, cfg: dict, tmp: Path, *extra: str, launcher: tuple[str, ...] = ("-m", "tlkd")
) -> dict:
    """Run ``tlkd mode`` on ``cfg``; the run's summary plus its first epoch's metrics row.
    ``launcher``: what follows the interpreter (a ``-c`` program that patches tlkd first)."""
    path = tmp / f"{cfg['experiment']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    run([PY, *launcher, mode, str(path), "-q", *extra], cwd=tmp)
    wall = time.perf_counter() - t0
    runs = sorted((tmp / "runs").glob(f"{cfg['experiment']}*"), key=os.path.getmtime)
    rd = runs[-1]
    summary = json.loads((rd / "summary.json").read_text())
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    return {
        "summary": summary,
        "row": rows[0],
        "last": rows[-1],
        "wall_s": wall,
        "run_dir": str(rd),
    }


def repeat(n: int, fn: Callable[[], float]) -> dict:
    values = [fn() for _ in range(n)]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), so results files of two machines differ."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def header(command: str) -> dict:
    """What every results file starts with: the machine, the command, the date."""
    return {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def ratio(a: dict, b: dict) -> float:
    return a["median"] / b["median"]


# ---------------------------------------------------------------- torchdistill


def torchdistill_python() -> Path:
    py = TD_VENV / "bin" / "python"
    if not (TD_VENV / ".installed").exists():
        log(f"installing torchdistill 1.1.5 into {TD_VENV} (several minutes, once)")
        subprocess.run([sys.executable, "-m", "venv", str(TD_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *TD_PIN], check=True)
        (TD_VENV / ".installed").touch()
    return py


# ---------------------------------------------------------------- the comparisons


def overhead(ctx) -> dict:
    """1. tlkd finetune vs a hand-written loop, the same work (files, workers, fp32). The loop
    takes tlkd's data path (uint8 from the workers, normalised per batch), so the ratio is the
    framework's own cost; the usual per-image-normalising loop is recorded beside it."""
    train, val, tmp, n = ctx["train"], ctx["val_small"], ctx["tmp"], ctx["repeats"]
    cfg = tlkd_config(tmp, "overhead", train, val, data__in_memory=False)
    tl = repeat(n, lambda: tlkd("finetune", cfg, tmp)["row"]["train_img_per_s"])
    hand = repeat(n, lambda: handloop("train-files", "--train", str(train), "--uint8")["img_s"])
    usual = repeat(n, lambda: handloop("train-files", "--train", str(train))["img_s"])
    return {
        "tlkd_img_s": tl,
        "hand_loop_img_s": hand,
        "usual_hand_loop_img_s": usual,
        "ratio": ratio(tl, hand),
        "ratio_vs_usual": ratio(tl, usual),
        "target": 0.97,
    }


def ceiling(ctx) -> dict:
    """2. End-to-end training vs one fixed in-memory batch (the compute limit). The three sides
    alternate, so drift hits them alike."""
    train, val, tmp, n = ctx["train"], ctx["val_small"], ctx["tmp"], ctx["repeats"]
    out = {}
    for label, knobs, flags in [
        ("fp32", {}, []),
        ("bf16_channels_last", {"train__precision": "bf16", "train__channels_last": True},
         ["--bf16", "--channels-last"]),
    ]:  # fmt: skip
        # steady state, as the fixed batch's: the second epoch (the first warms up)
        mem = tlkd_config(
            tmp, f"mem-{label}", train, val, data__in_memory=True, train__epochs=2, **knobs
        )
        files = tlkd_config(
            tmp, f"files-{label}", train, val, data__in_memory=False, train__epochs=2, **knobs
        )
        sides: dict[str, Callable[[], float]] = {
            "fixed_batch_img_s": lambda f=flags: handloop("train-fixed", "--steps", "30", *f)[
                "img_s"
            ],
            "in_memory_img_s": lambda c=mem: tlkd("finetune", c, tmp)["last"]["train_img_per_s"],
            "files_img_s": lambda c=files: tlkd("finetune", c, tmp)["last"]["train_img_per_s"],
        }
        values: dict[str, list[float]] = {k: [] for k in sides}
        for _ in range(n):
            for key, fn in sides.items():
                values[key].append(fn())
        res: dict = {k: _stats(v) for k, v in values.items()}
        res.update({
            "in_memory_ratio": ratio(res["in_memory_img_s"], res["fixed_batch_img_s"]),
            "files_ratio": ratio(res["files_img_s"], res["fixed_batch_img_s"]),
            "target": 0.95,
        })  # fmt: skip
        out[label] = res
    return out


def teacher_weights(tmp: Path) -> Path:
    """The resnet56 teacher of docs/results.md when present, else a random one (speed only)."""
    trained = REPO / "runs" / "c10-teacher-resnet56" / "model.safetensors"
    if trained.exists():
        return trained
    out = tmp / "resnet56.safetensors"
    run([PY, "-c", (
        "import timm, torch, tlkd.models.cifar; from safetensors.torch import save_file; "
        "torch.manual_seed(0); m = timm.create_model('resnet56', num_classes=10); "
        f"save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, '{out}')"
    )])  # fmt: skip
    return out


def versus_torchdistill(ctx) -> dict:
    """3. tlkd distill vs torchdistill 1.1.5: same teacher, student, data, batch, KD loss."""
    train, val, tmp, n = ctx["train_kd"], ctx["val_small"], ctx["tmp"], ctx["repeats"]
    weights = teacher_weights(tmp)
    td_py = torchdistill_python()
    td_cmd = [
        str(td_py), str(REPO / "bench" / "torchdistill_driver.py"), "--train", str(train),
        "--val", str(val), "--teacher", "resnet56", "--teacher-weights", str(weights),
        "--student", "resnet20", "--batch-size", "128", "--workers", "2", "--threads", "2",
    ]  # fmt: skip
    td_runs = [last_json(run(td_cmd, cwd=tmp)) for _ in range(n)]
    td_train = _stats([r["train_img_s"] for r in td_runs])
    td_eval = _stats([r["eval_img_s"] for r in td_runs])
    out = {"torchdistill_train_img_s": td_train, "torchdistill_eval_img_s": td_eval}
    for label, knobs in [
        ("fp32", {}),
        ("auto", {"train__precision": "auto", "train__channels_last": "auto"}),
    ]:
        cfg = tlkd_config(
            tmp, f"kd-{label}", train, val,
            teacher={"name": "resnet56", "pretrained": str(weights)},
            distill={"losses": [{"type": "kd", "weight": 0.9, "temperature": 4.0},
                                {"type": "ce", "weight": 0.1}]},
            train__optimizer={"name": "adamw", "lr": 2e-3, "weight_decay": 0.05},
            **knobs,
        )  # fmt: skip
        runs = [tlkd("distill", cfg, tmp) for _ in range(n)]
        t = _stats([r["row"]["train_img_per_s"] for r in runs])
        ev = [
            tlkd_eval(tmp, r["run_dir"], val)["predict_img_per_s"] for r in runs
        ]  # the student, as torchdistill's evaluation
        e = _stats(ev)
        out[f"tlkd_{label}"] = {
            "train_img_s": t,
            "eval_img_s": e,
            "train_ratio": ratio(t, td_train),
            "eval_ratio": ratio(e, td_eval),
            "precision": runs[0]["summary"]["precision"],
        }
    out["targets"] = {"train_ratio": 1.3, "eval_ratio": 1.0}
    return out


def tlkd_eval(tmp: Path, run_dir: str, val: Path, *over: str) -> dict:
    run([PY, "-m", "tlkd", "evaluate", run_dir, f"data.val={val}", "--no-speed", "-q", *over],
        cwd=tmp)  # fmt: skip
    return json.loads((Path(run_dir) / "eval.json").read_text())


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}  # fmt: skip


def teacher_cache(ctx) -> dict:
    """4. A sweep of 4 distillation runs (seeds), live teacher vs distill.cache."""
    train, val, tmp = ctx["train_kd"], ctx["val_small"], ctx["tmp"]
    weights = teacher_weights(tmp)
    out = {}
    for label, cache in [("live", None), ("cached", {"views": 4})]:
        cfg = tlkd_config(
            tmp, f"sweep-{label}", train, val,
            teacher={"name": "resnet56", "pretrained": str(weights)},
            distill={"losses": [{"type": "kd", "weight": 0.9, "temperature": 4.0},
                                {"type": "ce", "weight": 0.1}], "cache": cache},
            sweep={"grid": {"seed": [0, 1, 2, 3]}},
            train__epochs=2, train__precision="auto", train__channels_last="auto",
            data__subset_seed=0,
        )  # fmt: skip
        if cache is None:
            del cfg["distill"]["cache"]
        path = tmp / f"sweep-{label}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        # a fresh bank: the sweep pays for building it
        for f in (WORK / "cache" / "teacher").glob("*"):
            f.unlink()
        t0 = time.perf_counter()
        run([PY, "-m", "tlkd", "sweep", str(path)], cwd=tmp)
        out[f"{label}_sweep_s"] = time.perf_counter() - t0
    out["speedup"] = out["live_sweep_s"] / out["cached_sweep_s"]
    out["target"] = 1.5
    return out


def evaluate_speed(ctx) -> dict:
    """5. tlkd evaluate's pass over the 10,000 test images vs a raw inference_mode loop (fp32):
    the usual one (per-image ToTensor + Normalize in the workers) and one on tlkd's worker data
    path (uint8, normalised per batch). Sides alternate, so drift hits them alike."""
    train, val, tmp, n = ctx["train"], ctx["test"], ctx["tmp"], ctx["repeats"]
    cfg = tlkd_config(tmp, "to-eval", train, val, data__samples_per_class=13)
    rd = tlkd("finetune", cfg, tmp)["run_dir"]
    sides: dict[str, Callable[[], float]] = {
        "tlkd_in_memory_img_s": lambda: tlkd_eval(tmp, rd, val)["predict_img_per_s"],
        "tlkd_files_img_s": lambda: tlkd_eval(tmp, rd, val, "data.in_memory=false")[
            "predict_img_per_s"
        ],
        "raw_loop_img_s": lambda: handloop("eval-files", "--val", str(val))["img_s"],
        "raw_loop_uint8_img_s": lambda: handloop("eval-files", "--val", str(val), "--uint8")[
            "img_s"
        ],
    }
    tlkd_eval(tmp, rd, val)  # decodes the test images into the image cache, untimed
    values: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(n):
        for key, fn in sides.items():
            values[key].append(fn())
    out: dict = {k: _stats(v) for k, v in values.items()}
    raw, raw8 = out["raw_loop_img_s"], out["raw_loop_uint8_img_s"]
    out.update({
        "in_memory_ratio": ratio(out["tlkd_in_memory_img_s"], raw),
        "files_ratio": ratio(out["tlkd_files_img_s"], raw),
        "files_ratio_vs_uint8_loop": ratio(out["tlkd_files_img_s"], raw8),
        "target": 0.97,
    })  # fmt: skip
    return out


def knobs(ctx) -> dict:
    """6. channels_last, bf16 autocast, torch.compile, threads (fixed batch) and workers."""
    n, out = ctx["repeats"], {}
    for model in ("resnet20", "resnet18"):
        for label, flags, env in [
            ("fp32", [], {}),
            ("channels_last", ["--channels-last"], {}),
            ("bf16", ["--bf16"], {}),
            ("bf16_channels_last", ["--bf16", "--channels-last"], {}),
            ("fp32_1_thread", [], {"OMP_NUM_THREADS": "1"}),
        ]:
            out[f"{model}_{label}"] = repeat(n, lambda f=flags, e=env, m=model: handloop(
                "train-fixed", "--model", m, "--steps", "15", *f, env=e)["img_s"])  # fmt: skip
    compiled = handloop("train-fixed", "--steps", "15", "--compile")
    out["resnet20_compile"] = compiled
    train, val, tmp = ctx["train"], ctx["val_small"], ctx["tmp"]
    for workers in (0, 1, 2, 4):
        cfg = tlkd_config(tmp, f"workers{workers}", train, val, data__in_memory=False,
                          data__num_workers=workers)  # fmt: skip
        out[f"files_workers_{workers}"] = tlkd("finetune", cfg, tmp)["row"]["train_img_per_s"]
    return out


def scaling(ctx) -> dict:
    """Time per epoch against dataset size and batch size; peak memory (in-memory path)."""
    tmp, val, out = ctx["tmp"], ctx["val_small"], {}
    for per_class in (256, 512, 1024):
        train = subset("train", per_class)
        cfg = tlkd_config(tmp, f"size{per_class}", train, val, train__precision="auto",
                          train__channels_last="auto")  # fmt: skip
        r = tlkd("finetune", cfg, tmp)
        out[f"images_{per_class * 10}"] = {
            "epoch_s": r["row"]["epoch_time_s"],
            "img_s": r["row"]["train_img_per_s"],
            "peak_rss_mb": r["summary"]["peak_rss_mb"],
        }
    for batch in (32, 64, 128, 256):
        cfg = tlkd_config(tmp, f"batch{batch}", ctx["train"], val, train__batch_size=batch,
                          train__precision="auto", train__channels_last="auto")  # fmt: skip
        r = tlkd("finetune", cfg, tmp)
        out[f"batch_{batch}"] = {
            "epoch_s": r["row"]["epoch_time_s"],
            "img_s": r["row"]["train_img_per_s"],
            "peak_rss_mb": r["summary"]["peak_rss_mb"],
        }
    return out


COMPARISONS = {
    "overhead": overhead,
    "ceiling": ceiling,
    "torchdistill": versus_torchdistill,
    "teacher_cache": teacher_cache,
    "evaluate": evaluate_speed,
    "knobs": knobs,
    "scaling": scaling,
}


def main() -> None:
    if sys.argv[1:2] == ["gpu"]:  # the accelerator check: its own script (bench/gpu.py)
        from bench import gpu

        sys.argv = ["python -m bench gpu", *sys.argv[2:]]
        gpu.main()
        return
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("suite", choices=["quick", *COMPARISONS])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    names = list(COMPARISONS) if args.suite == "quick" else [args.suite]
    ctx = {
        "train": subset("train", 512),  # 5,120 images
        "train_kd": subset("train", 256),  # 2,560 images
        "test": subset("test", 1000),  # all 10,000 test images
        "val_small": subset("test", 20),  # 200 images: the val pass after each epoch
        "repeats": args.repeats,
    }
    results = header(f"python -m bench {args.suite} --repeats {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="tlkd-bench-") as tmp:
        ctx["tmp"] = Path(tmp)
        for name in names:
            log(f"== {name}")
            t0 = time.perf_counter()
            results[name] = COMPARISONS[name](ctx)
            results[name]["bench_s"] = round(time.perf_counter() - t0, 1)
            log(json.dumps(results[name], indent=1, default=str)[:4000])
    out = args.out or REPO / "bench" / "results" / f"{args.suite}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
