"""The accelerator check: ``python -m bench.gpu [--data DIR] [--out FILE]``, on a machine with
CUDA GPUs (the `device` tool's machine; see bench/README.md). About 5 minutes.

1. ceiling: one fixed batch on the GPU, trained on repeatedly (bf16 autocast, channels_last):
   resnet18 at 32 px, batch 256.
2. tlkd finetune on the same model, CIFAR-10 JPEG folders (5,120 images), in-memory path with
   the images resident in GPU memory, ``auto`` settings (bf16 + channels_last on CUDA): the
   second epoch's img/s, and its ratio to the ceiling.
3. with 2 or more GPUs: the same run under ``torchrun --nproc_per_node 2`` (nccl DDP, global
   batch 256): img/s over both, and the scaling against one GPU.

Prints and writes one JSON document; exits 3 (writing nothing) where there is no CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def ceiling(model_name: str, batch: int, steps: int = 60) -> dict:
    import timm

    import tlkd.models.cifar  # noqa: F401  (registers the CIFAR ResNets)

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return {"img_s": steps * batch / (time.perf_counter() - t0)}


def tlkd_run(tmp: Path, data: Path, gpus: int, batch: int) -> dict:
    cfg = {
        "experiment": f"gpu{gpus}",
        "output_dir": str(tmp / "runs"),
        "model": {"name": "resnet18", "pretrained": False},
        "data": {
            "train": str(data / "train"),
            "val": str(data / "test"),
            "samples_per_class": 512,
            "image_size": 32,
            "cache_dir": str(tmp / "cache"),
        },
        "train": {"epochs": 2, "batch_size": batch, "device": "cuda", "val_every": 100},
    }
    path = tmp / f"gpu{gpus}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launch = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}"]
        if gpus > 1
        else [sys.executable]
    )
    # the repo first, then what the caller set (the device's carried wheels: /tmp/site)
    path_env = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path_env}
    proc = subprocess.run(
        [*launch, "-m", "tlkd", "finetune", str(path), "-q"],
        capture_output=True, text=True, env=env, cwd=tmp,
    )  # fmt: skip
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    run = tmp / "runs" / f"gpu{gpus}"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    return {
        "img_s": rows[-1]["train_img_per_s"],  # every process's images (tlkd sums them)
        "data_path": summary["data_path"],
        "precision": summary["precision"],
        "startup_s": summary.get("startup_s"),
    }


def synthetic_jpegs(root: Path, per_class: int = 512, test_per_class: int = 50) -> Path:
    """CIFAR-sized JPEG folders (10 classes, ``root/train`` and ``root/test``) for a machine
    without the CIFAR-10 folders (the device machine has no data): a coloured square per
    class on noise. The speed figures need only the format and size; accuracy means nothing."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 96, (32, 32, 3), dtype=np.uint8)
                img[8:24, 8:24] = (25 * c, 255 - 25 * c, 120)
                Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    # CIFAR-10 JPEG folders (train/, test/); where missing, synthetic ones of the same size
    p.add_argument("--data", type=Path, default=Path("~/.cache/tlkd-data/cifar10").expanduser())
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench.gpu: not run: no CUDA GPU on this machine", file=sys.stderr)
        sys.exit(3)
    gpus = torch.cuda.device_count()
    out: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m bench.gpu",
    }
    out["ceiling"] = ceiling("resnet18", 256)
    with tempfile.TemporaryDirectory(prefix="tlkd-gpu-") as tmp:
        data = args.data
        if not (data / "train").is_dir():  # e.g. the device machine: made on the spot
            data = synthetic_jpegs(Path(tmp) / "data")
            out["data"] = "synthetic 32 px JPEGs, 512 per class (no CIFAR-10 folders here)"
        out["tlkd_1gpu"] = tlkd_run(Path(tmp), data, 1, 256)
        out["ratio_1gpu"] = out["tlkd_1gpu"]["img_s"] / out["ceiling"]["img_s"]
        if gpus >= 2:
            out["tlkd_ddp2"] = tlkd_run(Path(tmp), data, 2, 256)
            out["ddp_scaling"] = out["tlkd_ddp2"]["img_s"] / out["tlkd_1gpu"]["img_s"]
        else:
            out["tlkd_ddp2"] = "not run: one GPU"
    text = json.dumps(out, indent=1, default=str)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
