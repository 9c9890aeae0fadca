"""torchrun: 2 CPU processes with gloo match one process with the same global batch."""

import json
import subprocess
import sys

import torch
from conftest import tlkd_env
from safetensors.torch import load_file

# A model without BatchNorm: with the same global batches, DDP's averaged gradients equal the
# single process's, so the runs agree up to floating-point summation order.
DDP_SECTIONS = dict(
    data={
        "augment": {
            "crop_mode": "rkrr",
            "scale": [1.0, 1.0],
            "ratio": [1.0, 1.0],
            "hflip": 0.0,
            "color_jitter": 0.0,
        }
    },  # no randomness in the inputs
    model={"name": "test_vit", "kwargs": {"img_size": 16, "patch_size": 4}},
    # plain SGD: Adam's normalisation would magnify float-rounding differences in near-zero
    # gradients; with SGD the two runs agree to the tolerances below
    train={"epochs": 2, "batch_size": 8, "optimizer": {"name": "sgd", "lr": 0.05}},
)


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_process_gloo_matches_single_process(tmp_path, tiny_config, run_cli):
    single = tiny_config("single.yaml", experiment="single", **DDP_SECTIONS)
    double = tiny_config("ddp.yaml", experiment="ddp", **DDP_SECTIONS)
    env = tlkd_env()
    one = run_cli("finetune", single)  # the single process: this one
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tlkd",
            "finetune",
            str(double),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "single"]  # files written once
    assert two.stdout.count("done: best val top-1") == 1  # only rank 0 reports
    a, b = _metrics(runs / "single"), _metrics(runs / "ddp")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss"):
            assert abs(ra[key] - rb[key]) < 1e-4, (key, ra[key], rb[key])
        for key in ("train_top1", "val_top1", "val_top5", "lr"):
            assert ra[key] == rb[key], key
    summary = json.loads((runs / "ddp" / "summary.json").read_text())
    assert summary["val_images"] == 12 and summary["train_images"] == 24  # the whole sets
    wa, wb = (
        load_file(runs / "single" / "model.safetensors"),
        load_file(runs / "ddp" / "model.safetensors"),
    )
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
