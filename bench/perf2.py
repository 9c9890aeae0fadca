"""Issue 15's measurements: ``python -m bench.perf2 NAME [--repeats N]`` (see bench/README.md).

    teacher_runtime  a resnet56's inference forward: torch, channels_last, onnxruntime
    decode      ms per JPEG (500 and 1,000 px): PIL vs simplejpeg, full and reduced scale
    startup     tlkd --help, a config error, and a training run's start-up by phase
    compile     torch.compile vs eager, fixed batch: resnet20, resnet18, mobilenetv3_small_100
                at 32 and 224 px (step time, compile time, the steps that pay it back), and one
                tlkd run each way
    folder224   the image-folder path at 224 px on JPEGs larger than that (500 and 1,000 px),
                against the fixed-batch ceiling: reduced-scale decoding on/off, worker counts
    folder224mem  the same folders on the in-memory path: in memory and memory-mapped
    folder224mixed  a folder of JPEGs of four sizes: loader workers against the in-memory path
    folder224pair  mobilenetv3 at 224 px: the ceiling, then workers and in-memory right after
    augment_cost  ms per image of the in-memory views at 224 px: per image vs one grid_sample
    inproc224   the in-memory path against a fixed batch inside one process (no drift between)
    mixed_accuracy  the same kind of folder: test top-1 of both paths (resnet20, 64 px, 2 seeds)
    kd          tlkd distill against a hand-written KD loop doing the same work
    cache56     the 4-run resnet56 -> resnet20 sweep, live teacher vs distill.cache

Like ``python -m bench``: sides run as separate processes one after another; medians with
min-max; results to bench/results/perf2-<name>.json. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from bench.__main__ import (
    PY,
    REPO,
    WORK,
    _stats,
    handloop,
    header,
    log,
    ratio,
    repeat,
    run,
    subset,
    tlkd,
    tlkd_config,
)


def teacher_run() -> Path:
    """The trained resnet56 the distillation configs name (configs/cifar10-distill/kd.yaml)."""
    import yaml

    kd = yaml.safe_load((REPO / "configs" / "cifar10-distill" / "kd.yaml").read_text())
    return REPO / kd["teacher"]["pretrained"]


def _wall(cmd: list[str], tmp: Path, expect: int = 0) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    wall = time.perf_counter() - t0
    if proc.returncode != expect:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return wall


def startup(ctx) -> dict:
    """tlkd --help and a config error (best of 5), and a one-epoch run's startup_s."""
    tmp, out = ctx["tmp"], {}
    tl = str(Path(PY).with_name("tlkd"))
    bad = tmp / "bad.yaml"
    bad.write_text("model: {name: resnet20}\ntrain: {lr: 0.1}\n")
    out["help_s"] = min(_wall([tl, "--help"], tmp) for _ in range(5))
    out["config_error_s"] = min(_wall([tl, "finetune", str(bad)], tmp, expect=2) for _ in range(5))
    runs = []
    for i in range(ctx["repeats"]):
        cfg = tlkd_config(tmp, f"start{i}", ctx["train"], ctx["val_small"], train__epochs=1)
        runs.append(tlkd("finetune", cfg, tmp))
    phases = sorted({k for r in runs for k in r["summary"]["startup_s"]})
    out["training_startup_s"] = {
        k: _stats([r["summary"]["startup_s"].get(k, 0.0) for r in runs]) for k in phases
    }
    out["targets"] = {"help_s": 0.5, "config_error_s": 0.5}
    return out


COMPILE_CASES = [  # model, size, batch
    ("resnet20", 32, 128),
    ("resnet18", 32, 128),
    ("mobilenetv3_small_100", 32, 128),
    ("resnet20", 224, 32),
    ("resnet18", 224, 32),
    ("mobilenetv3_small_100", 224, 32),
]


def compile_(ctx) -> dict:
    """Fixed-batch steps eager vs compiled; compile_s = the compiled warm-up minus the eager
    one; break_even_steps = compile_s / (eager step - compiled step)."""
    out = {}
    # every compiled process compiles from nothing: inductor's on-disk caches would let a
    # rerun (or the tlkd run below, same shapes as a fixed-batch case) understate compile_s
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    for model, size, batch in COMPILE_CASES:
        steps = "20" if size == 32 else "8"
        common = ["--model", model, "--size", str(size), "--batch-size", str(batch)]
        eager = [handloop("train-fixed", *common, "--steps", steps) for _ in range(ctx["repeats"])]
        comp = handloop("train-fixed", *common, "--steps", steps, "--compile")
        t_e = statistics.median(batch / r["img_s"] for r in eager)
        t_c = batch / comp["img_s"]
        compile_s = comp["warmup_s"] - statistics.median(r["warmup_s"] for r in eager)
        out[f"{model}_{size}"] = {
            "eager_step_s": t_e,
            "eager_img_s": _stats([r["img_s"] for r in eager]),
            "compiled_step_s": t_c,
            "speedup": t_e / t_c,
            "compile_s": compile_s,
            "break_even_steps": compile_s / (t_e - t_c) if t_e > t_c else None,
        }
    # one whole run each way: resnet20, 32 px, 5,120 images, 3 epochs
    tmp = ctx["tmp"]
    for label, on in (("eager", False), ("compiled", True)):
        cfg = tlkd_config(
            tmp, f"run-{label}", ctx["train"], ctx["val_small"], data__in_memory=True,
            train__epochs=3, train__compile=on,
        )  # fmt: skip
        r = tlkd("finetune", cfg, tmp)
        out[f"run_{label}"] = {"wall_s": r["wall_s"], "img_s": r["last"]["train_img_per_s"]}
    out["run_speedup"] = out["run_eager"]["wall_s"] / out["run_compiled"]["wall_s"]
    return out


def large_jpegs(side: int, per_class: int = 100) -> Path:
    """CIFAR-10 training images upsampled to ``side`` x ``side * 3 // 4`` px JPEGs (quality
    90): the decode cost of photos that size (their content is CIFAR's, blurred)."""
    out = WORK / "data" / f"jpeg{side}-{per_class}"
    if out.is_dir():
        return out
    from PIL import Image

    tmp = out.with_suffix(".tmp")
    src = subset("train", per_class)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (tmp / cls.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(cls.iterdir()):
            img = Image.open(f).convert("RGB").resize((side, side * 3 // 4), Image.BICUBIC)
            img.save(tmp / cls.name / f"{f.stem}.jpg", quality=90)
    tmp.rename(out)
    return out


def folder224(ctx) -> dict:
    """Steady-state (second epoch) img/s of tlkd's image-folder path at 224 px, over the
    fixed-batch ceiling of the same model and batch."""
    tmp, n, out = ctx["tmp"], ctx["repeats"], {}
    val = large_jpegs(500, 2)  # 20 val images: the pass after each epoch stays short
    for model in ("mobilenetv3_small_100", "resnet18"):
        fixed = repeat(n, lambda m=model: handloop(
            "train-fixed", "--model", m, "--size", "224", "--batch-size", "32", "--steps", "8"
        )["img_s"])  # fmt: skip
        res: dict = {"fixed_batch_img_s": fixed}
        for side in (500, 1000):
            train = large_jpegs(side)
            # 224 px at crop 0.875 needs a 256 px short side (310 with the light policy's
            # scale): a 500 x 375 JPEG is never decoded at a reduced scale, so draft on = off
            for draft in (False, True) if side >= 1000 else (False,):
                for workers in (2, 4):
                    cfg = tlkd_config(
                        tmp, f"f{side}-{draft}-{workers}", train, val,
                        model={"name": model, "pretrained": False},
                        data__image_size=224, data__crop_pct=0.875, data__in_memory=False,
                        data__jpeg_draft=draft, data__num_workers=workers,
                        data__augment={"policy": "light"}, train__epochs=2, train__batch_size=32,
                    )  # fmt: skip
                    img_s = repeat(
                        n, lambda c=cfg: tlkd("finetune", c, tmp)["last"]["train_img_per_s"]
                    )
                    res[f"src{side}_draft_{draft}_workers_{workers}"] = {
                        "img_s": img_s,
                        "ratio": ratio(img_s, fixed),
                    }
        out[model] = res
    out["target"] = 0.95
    return out


# a tlkd whose memory budget is nil: data of any size take the memory-mapped path
MAPPED = (
    "-c",
    "import tlkd.data.memory as m; m.MEMORY_FRACTION = 0.0; from tlkd.cli import main; main()",
)


MIXED_SIZES = ((500, 375), (375, 500), (480, 480), (640, 360))  # width, height


def mixed_jpegs(per_class: int = 100, split: str = "train", scale: float = 1.0) -> Path:
    """CIFAR-10 images upsampled to four sizes and shapes in turn (MIXED_SIZES times
    ``scale``): a folder of photos as a user has them, which no single tensor can hold."""
    out = WORK / "data" / f"jpegmixed-{split}-{per_class}-{scale:g}"
    if out.is_dir():
        return out
    from PIL import Image

    tmp = out.with_suffix(".tmp")
    src = subset(split, per_class)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (tmp / cls.name).mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(sorted(cls.iterdir())):
            w, h = MIXED_SIZES[i % len(MIXED_SIZES)]
            size = (round(w * scale), round(h * scale))
            img = Image.open(f).convert("RGB").resize(size, Image.BICUBIC)
            img.save(tmp / cls.name / f"{f.stem}.jpg", quality=90)
    tmp.rename(out)
    return out


def folder224mixed(ctx) -> dict:
    """A folder of JPEGs of four sizes at 224 px: loader workers (2) against the in-memory
    path (each image stored at its own size), second-epoch img/s over the ceiling."""
    tmp, n, out = ctx["tmp"], ctx["repeats"], {}
    val, train = large_jpegs(500, 2), mixed_jpegs()
    for model in ("mobilenetv3_small_100", "resnet18"):
        fixed = repeat(n, lambda m=model: handloop(
            "train-fixed", "--model", m, "--size", "224", "--batch-size", "32", "--steps", "8"
        )["img_s"])  # fmt: skip
        res: dict = {"fixed_batch_img_s": fixed}
        for name, in_memory in (("workers_2", False), ("memory", True)):
            cfg = tlkd_config(
                tmp, f"x{name}", train, val, model={"name": model, "pretrained": False},
                data__image_size=224, data__crop_pct=0.875, data__in_memory=in_memory,
                data__num_workers=2, data__augment={"policy": "light"},
                train__epochs=2, train__batch_size=32,
            )  # fmt: skip
            got = [tlkd("finetune", cfg, tmp) for _ in range(n)]
            img_s = {
                "median": statistics.median(g["last"]["train_img_per_s"] for g in got),
                "values": [g["last"]["train_img_per_s"] for g in got],
            }
            res[name] = {
                "img_s": img_s, "ratio": ratio(img_s, fixed),
                "data_path": got[0]["summary"].get("data_path"),
            }  # fmt: skip
        out[model] = res
    out["target"] = 0.95
    return out


def mixed_accuracy(ctx) -> dict:
    """Does the in-memory path (each image at its own size, views cut per image) train as well
    as loader workers running timm's PIL transforms? CIFAR-10 upsampled to four sizes (80 x 60
    to 102 x 58 px), resnet20 at 64 px, 5 epochs on 5,000 images, test top-1 on 1,000 test
    images (also of four sizes), seeds 0 and 1, each side with the same auto settings."""
    tmp, out = ctx["tmp"], {}
    train = mixed_jpegs(500, "train", 0.16)
    test = mixed_jpegs(100, "test", 0.16)
    for name, in_memory in (("workers", False), ("memory", True)):
        rows = []
        for seed in (0, 1):
            cfg = tlkd_config(
                tmp, f"acc-{name}-{seed}", train, test, seed=seed,
                data__image_size=64, data__crop_pct=0.875, data__in_memory=in_memory,
                data__augment={"crop_mode": "rrc", "scale": [0.35, 1.0], "hflip": 0.5},
                train__epochs=5, train__precision="auto", train__channels_last="auto",
                train__optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
                train__scheduler={"name": "cosine", "warmup_epochs": 1},
            )  # fmt: skip
            r = tlkd("finetune", cfg, tmp)
            rows.append({
                "seed": seed, "val_top1": r["last"]["val_top1"], "wall_s": r["wall_s"],
                "data_path": r["summary"].get("data_path"),
            })  # fmt: skip
        accs = [x["val_top1"] for x in rows]
        out[name] = {"runs": rows, "mean": statistics.mean(accs), "std": statistics.stdev(accs)}
    return out


def augment_cost(ctx) -> dict:
    """ms per image of the in-memory path's training views at 224 px (rrc, flip; batch 32;
    2 threads): cut and resized per image (what a CPU runs now) against one grid_sample over
    the gathered float batch (what it ran before, and what accelerators run), median of 10."""
    import torch

    from tlkd.config.schema import AugmentConfig
    from tlkd.data.batch_aug import BatchAugment, _resample_batch

    torch.set_num_threads(2)
    aug = BatchAugment(AugmentConfig(crop_mode="rrc", hflip=0.5, color_jitter=0.0), 224,
                       (0.5,) * 3, (0.25,) * 3)  # fmt: skip
    out = {}
    for h, w in ((375, 500), (750, 1000)):
        store = torch.randint(0, 256, (500, 3, h, w), dtype=torch.uint8)
        g = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {"per_image": [], "grid_sample_batch": []}
        for _ in range(12):
            idx = torch.randint(0, len(store), (32,), generator=g)
            params = aug.sample(32, h, w, g)
            t0 = time.perf_counter()
            aug.apply(store, params, idx)
            t1 = time.perf_counter()
            _resample_batch(store[idx].float().div_(255), params, 224, "bilinear")
            t2 = time.perf_counter()
            times["per_image"].append((t1 - t0) / 32 * 1e3)
            times["grid_sample_batch"].append((t2 - t1) / 32 * 1e3)
        out[f"{w}x{h}"] = {k: _stats(v[2:]) for k, v in times.items()}
    return out


def inproc224(ctx) -> dict:
    """The in-memory path's cost inside one process, where this host's drift cannot come
    between the two sides: K training steps on one fixed batch, then K on the loader's live
    batches, alternating 4 times (the model, loader and settings tlkd builds for the config;
    the step a plain forward/backward/AdamW update). Folders: 500 px JPEGs, and four sizes."""
    import torch

    from tlkd.config import load_config
    from tlkd.recipes.build import build_experiment

    tmp, out = ctx["tmp"], {}
    val = large_jpegs(500, 2)
    for folder, train in (("src500", large_jpegs(500)), ("mixed", mixed_jpegs())):
        for model, k in (("mobilenetv3_small_100", 12), ("resnet18", 4)):
            cfg = tlkd_config(
                tmp, f"i{folder}{model}", train, val, model={"name": model, "pretrained": False},
                data__image_size=224, data__crop_pct=0.875, data__in_memory=True,
                data__augment={"policy": "light"}, train__batch_size=32,
            )  # fmt: skip
            path = tmp / f"i{folder}{model}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            torch.set_num_threads(2)
            exp = build_experiment(load_config(str(path), []), log=lambda m: None)
            loader, net = exp.loaders.train, exp.model.train()
            opt = torch.optim.AdamW(net.parameters(), 1e-3)

            def step(x, y, net=net, opt=opt):
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            fx, fy = next(iter(loader))
            step(fx, fy)
            fixed, live = [], []
            batches = iter(())
            for _ in range(4):
                t0 = time.perf_counter()
                for _ in range(k):
                    step(fx, fy)
                fixed.append(k * 32 / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for _ in range(k):
                    batch = next(batches, None)
                    if batch is None:
                        batches = iter(loader)
                        batch = next(batches)
                    step(*batch)
                live.append(k * 32 / (time.perf_counter() - t0))
            out[f"{folder}_{model}"] = {
                "fixed_img_s": _stats(fixed), "live_img_s": _stats(live),
                "ratio": statistics.median(live) / statistics.median(fixed),
                "data_path": exp.loaders.note,
            }  # fmt: skip
    return out


def folder224pair(ctx) -> dict:
    """mobilenetv3_small_100 at 224 px, each repeat the ceiling (31 steps: one epoch's worth)
    then every cell right after it, so each ratio is taken within minutes (this host's speed
    drifts by 10% from minute to minute): loader workers against the in-memory path."""
    tmp, n, model = ctx["tmp"], ctx["repeats"], "mobilenetv3_small_100"
    val = large_jpegs(500, 2)
    cells = (  # name: (source side, in memory, memory-mapped)
        ("src500_workers_2", 500, False, False),
        ("src500_memory", 500, True, False),
        ("src500_mapped", 500, True, True),
        ("src1000_draft_memory", 1000, True, False),
    )
    rows: dict[str, list] = {"fixed_batch_img_s": []}
    for _ in range(n):
        rows["fixed_batch_img_s"].append(handloop(
            "train-fixed", "--model", model, "--size", "224", "--batch-size", "32", "--steps", "31"
        )["img_s"])  # fmt: skip
        for name, side, in_memory, mapped in cells:
            cfg = tlkd_config(
                tmp, f"p{name}", large_jpegs(side), val, model={"name": model, "pretrained": False},
                data__image_size=224, data__crop_pct=0.875, data__in_memory=in_memory,
                data__num_workers=2, data__augment={"policy": "light"},
                train__epochs=2, train__batch_size=32,
            )  # fmt: skip
            got = tlkd("finetune", cfg, tmp, launcher=MAPPED if mapped else ("-m", "tlkd"))
            rows.setdefault(name, []).append(
                {"img_s": got["last"]["train_img_per_s"], "data_path": got["summary"]["data_path"]}
            )
    fixed = rows["fixed_batch_img_s"]
    out: dict = {"model": model, "fixed_batch_img_s": _stats(fixed)}
    for name, *_ in cells:
        img_s = [r["img_s"] for r in rows[name]]
        pair = [a / b for a, b in zip(img_s, fixed, strict=True)]
        out[name] = {
            "img_s": _stats(img_s), "ratio_per_repeat": pair,
            "ratio_median": statistics.median(pair), "data_path": rows[name][0]["data_path"],
        }  # fmt: skip
    out["target"] = 0.95
    return out


def folder224mem(ctx) -> dict:
    """folder224's cells on the in-memory path: the same image folders decoded once into a
    uint8 tensor (in memory, or memory-mapped from the cache folder as for data larger than
    the memory budget), views cut and resized per image; second-epoch img/s over the ceiling."""
    tmp, n, out = ctx["tmp"], ctx["repeats"], {}
    val = large_jpegs(500, 2)
    cells = {  # name: (source side, jpeg_draft, memory-mapped)
        "mobilenetv3_small_100": [
            ("src500_memory", 500, True, False), ("src500_mapped", 500, True, True),
            ("src1000_draft_memory", 1000, True, False),
            ("src1000_full_memory", 1000, False, False),
            ("src1000_draft_mapped", 1000, True, True),
        ],
        "resnet18": [
            ("src500_memory", 500, True, False), ("src500_mapped", 500, True, True),
            ("src1000_draft_memory", 1000, True, False),
        ],
    }  # fmt: skip
    for model, rows in cells.items():
        fixed = repeat(n, lambda m=model: handloop(
            "train-fixed", "--model", m, "--size", "224", "--batch-size", "32", "--steps", "8"
        )["img_s"])  # fmt: skip
        res: dict = {"fixed_batch_img_s": fixed}
        for name, side, draft, mapped in rows:
            cfg = tlkd_config(
                tmp, f"m{name}", large_jpegs(side), val,
                model={"name": model, "pretrained": False},
                data__image_size=224, data__crop_pct=0.875, data__in_memory=True,
                data__jpeg_draft=draft, data__augment={"policy": "light"},
                train__epochs=2, train__batch_size=32,
            )  # fmt: skip
            launcher = MAPPED if mapped else ("-m", "tlkd")
            got = [tlkd("finetune", cfg, tmp, launcher=launcher) for _ in range(n)]
            img_s = {
                "median": statistics.median(g["last"]["train_img_per_s"] for g in got),
                "values": [g["last"]["train_img_per_s"] for g in got],
            }
            data_path = got[0]["summary"].get("data_path")
            res[name] = {"img_s": img_s, "ratio": ratio(img_s, fixed), "data_path": data_path}
        out[model] = res
    out["target"] = 0.95
    return out


def kd(ctx) -> dict:
    """tlkd distill (its defaults: in-memory path, auto settings) vs bench/handloop.py kd-files
    (ImageFolder + 2 workers, teacher under inference_mode): resnet56 -> resnet20, 5,120
    images, batch 128, one epoch; alternating."""
    tmp, n = ctx["tmp"], ctx["repeats"]
    teacher = teacher_run()
    weights = teacher / "model.safetensors"
    cfg = tlkd_config(
        tmp, "kd", ctx["train"], ctx["val_small"],
        teacher={"name": "resnet56", "pretrained": str(teacher)},
        distill={"losses": [{"type": "kd", "weight": 0.9, "temperature": 4.0},
                            {"type": "ce", "weight": 0.1}]},
        train__optimizer={"name": "adamw", "lr": 2e-3, "weight_decay": 0.05},
        train__precision="auto", train__channels_last="auto",
    )  # fmt: skip
    del cfg["data"]["num_workers"]
    values: dict[str, list[float]] = {"tlkd_img_s": [], "hand_img_s": []}
    for _ in range(n):
        values["tlkd_img_s"].append(tlkd("distill", cfg, tmp)["row"]["train_img_per_s"])
        values["hand_img_s"].append(
            handloop(
                "kd-files",
                "--train",
                str(ctx["train"]),
                "--teacher",
                "resnet56",
                "--teacher-weights",
                str(weights),
                "--uint8",
            )["img_s"]  # fmt: skip
        )
    out: dict = {k: _stats(v) for k, v in values.items()}
    out["ratio"] = ratio(out["tlkd_img_s"], out["hand_img_s"])
    out["target"] = 1.5
    return out


def cache56(ctx) -> dict:
    """configs/cifar10-distill/cache-live.yaml vs cache-bank.yaml with 4 views (resnet56 ->
    resnet20, 4 seeds, 8 epochs of 5,000 images; the teacher the distill configs name, or
    --teacher), each sweep paying for its own bank; back to back."""
    out = {}
    tl = str(Path(PY).with_name("tlkd"))
    cache = WORK / "cache-perf2"  # the bench's own: decoded images kept, teacher files not
    sides = (
        ("live", "cache-live.yaml", []),
        ("cached", "cache-bank.yaml", ["distill.cache.views=4"]),
    )
    folder = REPO / "configs" / "cifar10-distill"
    # untimed: one short live run pays what both sides share (decoding the images into the
    # cache folder, precision/channels_last and teacher-runtime timing), so neither sweep does
    # --teacher: another trained resnet56 run (the speed does not depend on how good it is)
    teacher = [f"teacher.pretrained={ctx['teacher']}"] if ctx.get("teacher") else []
    run([tl, "distill", str(folder / "cache-live.yaml"), "train.epochs=1", "-q", *teacher,
         "experiment=warm-up", f"data.cache_dir={cache}", f"output_dir={ctx['tmp'] / 'warm'}"],
        cwd=REPO)  # fmt: skip
    for label, config, over in sides:
        for f in (cache / "teacher").glob("*"):
            f.unlink()  # a fresh bank (and teacher val score): each sweep pays for its own
        runs = ctx["tmp"] / f"runs-{label}"
        t0 = time.perf_counter()
        over = [*over, *teacher, f"data.cache_dir={cache}", f"output_dir={runs}"]
        run([tl, "sweep", str(folder / config), *over], cwd=REPO)
        out[f"{label}_sweep_s"] = time.perf_counter() - t0
        summaries = [
            json.loads(f.read_text())
            for f in sorted(runs.glob("**/summary.json"))  # <experiment>-sweep/<run>/
        ]
        summaries = [x for x in summaries if x.get("mode") == "distill"]
        # accuracy: the target is speed at an accuracy within the seed spread
        out[f"{label}_val_top1"] = _stats([x["final_val_top1"] for x in summaries])
        out[f"{label}_breakdown"] = _breakdown(summaries)
    out["speedup"] = out["live_sweep_s"] / out["cached_sweep_s"]
    out["target"] = 1.5
    return out


def _breakdown(summaries: list[dict]) -> dict:
    """Where a sweep's time went, summed over its runs: start-up by phase (the teacher
    cache's bank among them, up to the first step), the training loop's wall time, of which
    the training epochs (metrics.jsonl) and the rest (val passes, checkpoints)."""
    phases: dict[str, float] = {}
    for x in summaries:
        for k, v in x["startup_s"].items():
            phases[k] = phases.get(k, 0.0) + v
    epochs = sum(
        json.loads(line)["epoch_time_s"]
        for x in summaries
        for line in (Path(x["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    )
    wall = sum(x["wall_time_s"] for x in summaries)
    return {"startup_s": phases, "loop_s": wall, "train_epochs_s": epochs, "rest_s": wall - epochs}


def decode_speed(ctx) -> dict:
    """ms per image (one thread, median of 5 passes over 20 files) to decode a JPEG of 500 and
    1,000 px (long side) to RGB: PIL and simplejpeg, at full size and at the reduced scale that
    keeps 256 px (the eval resize of a 224 px run)."""
    import io

    import numpy as np
    from PIL import Image

    from tlkd.data import decode

    files = sorted(subset("train", 2).rglob("*.jpg"))
    out: dict = {}
    for side in (500, 1000):
        blobs = []
        for f in files:
            b = io.BytesIO()
            img = Image.open(f).convert("RGB").resize((side, side * 3 // 4), Image.BICUBIC)
            img.save(b, "JPEG", quality=90)
            blobs.append(b.getvalue())
        paths = []
        for i, data in enumerate(blobs):
            path = ctx["tmp"] / f"{side}-{i}.jpg"
            path.write_bytes(data)
            paths.append(str(path))
        saved = decode.simplejpeg
        for name, turbo, need in [
            ("pil_full", False, 0), ("pil_reduced", False, 256),
            ("simplejpeg_full", True, 0), ("simplejpeg_reduced", True, 256),
        ]:  # fmt: skip
            decode.simplejpeg = saved if turbo else None
            load = decode.ImageLoader(need)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for p in paths:
                    load(p)
                times.append((time.perf_counter() - t0) / len(paths) * 1000)
            out[f"src{side}_{name}"] = {
                "ms": _stats(times),
                "decoded_size": list(load(paths[0]).size),
            }
        decode.simplejpeg = saved
        same = all(
            np.array_equal(np.asarray(decode.ImageLoader(n)(p)), _pil(p, n))
            for p in paths
            for n in (0, 256)
        )
        out[f"src{side}_simplejpeg_equals_pil"] = same
    return out


def _pil(path: str, need: int):
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        if need:
            img.draft("RGB", (need, need))
        return np.asarray(img.convert("RGB"))


def teacher_runtime(ctx) -> dict:
    """ms per inference forward pass of a resnet56 (batch 64, 32 px, fp32, torch's threads):
    each teacher.runtime, and torch.compile with inductor's freezing (not a runtime tlkd
    offers: measured for comparison, compile time included)."""
    import copy

    import timm
    import torch

    import tlkd.models.cifar  # noqa: F401
    from tlkd.distill import runtime as rt

    torch.manual_seed(0)
    model = timm.create_model("resnet56", num_classes=10).eval()
    x = torch.randn(64, 3, 32, 32)
    out: dict = {"threads": torch.get_num_threads()}
    for name in rt.RUNTIMES:
        times = [rt.time_runtime(name, model, x, None) * 1000 for _ in range(ctx["repeats"])]
        out[name] = {"ms": _stats(times)}
    import torch._inductor.config as inductor

    inductor.freezing = True
    t0 = time.perf_counter()
    compiled = torch.compile(copy.deepcopy(model))
    with torch.inference_mode():
        compiled(x)
        out["torch_compile_freezing"] = {"compile_s": time.perf_counter() - t0}
        times = []
        for _ in range(ctx["repeats"] * 3):
            t = time.perf_counter()
            compiled(x)
            times.append((time.perf_counter() - t) * 1000)
    out["torch_compile_freezing"]["ms"] = _stats(times)
    base = out["torch"]["ms"]["median"]
    for v in out.values():
        if isinstance(v, dict):
            v["speedup"] = base / v["ms"]["median"]
    return out


COMPARISONS = {
    "teacher_runtime": teacher_runtime,
    "decode": decode_speed,
    "startup": startup,
    "compile": compile_,
    "folder224": folder224,
    "folder224mem": folder224mem,
    "folder224mixed": folder224mixed,
    "folder224pair": folder224pair,
    "augment_cost": augment_cost,
    "inproc224": inproc224,
    "mixed_accuracy": mixed_accuracy,
    "kd": kd,
    "cache56": cache56,
}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.perf2", description=__doc__)
    p.add_argument("name", choices=list(COMPARISONS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--teacher", help="cache56: a resnet56 run to distil from (default: kd.yaml's)")
    args = p.parse_args()
    ctx = {
        "train": subset("train", 512),
        "val_small": subset("test", 20),
        "repeats": args.repeats,
        "teacher": args.teacher and str(Path(args.teacher).resolve()),
    }
    cmd = f"python -m bench.perf2 {args.name} --repeats {args.repeats}"
    results = header(cmd + (f" --teacher {args.teacher}" if args.teacher else ""))
    with tempfile.TemporaryDirectory(prefix="tlkd-perf2-") as tmp:
        ctx["tmp"] = Path(tmp)
        t0 = time.perf_counter()
        results[args.name] = COMPARISONS[args.name](ctx)
        results[args.name]["bench_s"] = round(time.perf_counter() - t0, 1)
    out = REPO / "bench" / "results" / f"perf2-{args.name}.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    log(json.dumps(results, indent=1, default=str)[:6000])
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
