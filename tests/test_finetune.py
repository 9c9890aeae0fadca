"""`tlkd finetune`: the run directory contract, reproducibility, timm-compatible weights,
and that it actually learns."""

from __future__ import annotations

import json
import platform

import pytest
import timm
import torch
import yaml
from conftest import MODEL, small_config
from PIL import Image

import tlkd
from tlkd.config.schema import ModelConfig
from tlkd.models.factory import build_model
from tlkd.run.rundir import RunDir

EPOCH_KEYS = {
    "epoch",
    "train_loss",
    "val_loss",
    "val_top1",
    "val_top5",
    "lr",
    "epoch_time_s",
    "train_img_per_s",
}


def metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_run_dir_has_every_file(trained_run):
    names = {p.name for p in trained_run.dir.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "model.safetensors",
        "checkpoint.pt",
        "curves.png",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]  # atomic writes leave no temp files
    assert str(trained_run.dir) in trained_run.output


def test_metrics_has_one_json_row_per_epoch(trained_run):
    rows = metrics(trained_run.dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert row.keys() >= EPOCH_KEYS
        assert row["train_loss"] > 0 and row["val_loss"] > 0
        assert 0 <= row["val_top1"] <= row["val_top5"] <= 100
        assert row["lr"] == pytest.approx(0.01)  # scheduler: none
        assert row["epoch_time_s"] > 0 and row["train_img_per_s"] > 0


def test_summary(trained_run):
    summary = json.loads((trained_run.dir / "summary.json").read_text())
    rows = metrics(trained_run.dir)
    assert summary["status"] == "finished"
    assert summary["epochs_done"] == 2
    assert summary["best_val_top1"] == max(r["val_top1"] for r in rows)
    best = summary["best_epoch"]
    assert rows[best - 1]["val_top1"] == summary["best_val_top1"]
    assert summary["final_val_top1"] == rows[-1]["val_top1"]
    model = timm.create_model(MODEL, num_classes=3)
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    assert summary["trainable_params"] == summary["params"]
    assert summary["wall_time_s"] > 0
    assert summary["classes"] == trained_run.classes
    assert (summary["train_images"], summary["val_images"]) == (24, 12)
    versions = summary["versions"]
    assert versions["python"] == platform.python_version()
    assert versions["torch"] == torch.__version__
    assert versions["timm"] == timm.__version__
    assert versions["tlkd"] == tlkd.__version__


def test_config_yaml_is_the_config_and_what_tlkd_chose(trained_run):
    saved = yaml.safe_load((trained_run.dir / "config.yaml").read_text())
    assert saved["experiment"] == "shared"
    assert saved["model"]["name"] == MODEL
    assert saved["model"]["num_classes"] is None  # as given; chosen from the data:
    assert saved["resolved"]["model.num_classes"] == 3
    assert saved["data"]["train"] == str(trained_run.train)
    assert saved["data"]["image_size"] == 16
    assert saved["train"]["epochs"] == 2
    assert saved["train"]["optimizer"]["weight_decay"] == 0.0
    assert saved["train"]["scheduler"]["name"] == "none"
    assert saved["resolved"]["train.scheduler.warmup_epochs"] == 0  # no scheduler, no warm-up


def test_checkpoint_loads_with_weights_only(trained_run):
    ckpt = torch.load(trained_run.dir / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng"} <= ckpt.keys()
    assert ckpt["epoch"] == 2
    assert ckpt["scheduler"] is None  # scheduler: none
    assert ckpt["optimizer"]["state"]  # adamw moments after training
    model = timm.create_model(MODEL, num_classes=3)
    model.load_state_dict(ckpt["model"])  # the final epoch's full state dict
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)


def test_best_weights_match_the_best_epoch(trained_run):
    """model.safetensors holds the best epoch's weights; after the best epoch it is not
    overwritten, and when the last epoch is best it equals the checkpoint's model."""
    from safetensors.torch import load_file

    summary = json.loads((trained_run.dir / "summary.json").read_text())
    weights = load_file(str(trained_run.dir / "model.safetensors"))
    final = torch.load(trained_run.dir / "checkpoint.pt", weights_only=True)["model"]
    same = all(torch.equal(weights[k], final[k]) for k in final)
    assert same == (summary["best_epoch"] == summary["epochs_done"])


def test_curves_png_is_an_image(trained_run):
    with Image.open(trained_run.dir / "curves.png") as img:
        assert img.format == "PNG"
        assert img.width > 200 and img.height > 100


def test_safetensors_loads_in_plain_timm(trained_run):
    path = trained_run.dir / "model.safetensors"
    plain = timm.create_model(
        MODEL,
        pretrained=True,
        num_classes=3,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=3),
    ).eval()
    ours, report = build_model(
        ModelConfig(name=MODEL, pretrained=str(trained_run.dir)), 3, trained_run.classes
    )
    assert report.head == "loaded"
    ours.eval()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(plain(x), ours(x))
    random = timm.create_model(MODEL, num_classes=3).eval()
    with torch.no_grad():
        assert not torch.allclose(random(x), ours(x))


def test_rerunning_saved_config_reproduces_metrics_in_a_new_dir(trained_run, cli):
    result = cli("finetune", trained_run.dir / "config.yaml")
    assert result.exit_code == 0, result.output
    rerun = trained_run.dir.parent / "shared-2"
    assert rerun.is_dir()  # same experiment name: the first run's folder is never reused
    first, second = metrics(trained_run.dir), metrics(rerun)
    assert len(first) == len(second) == 2
    for a, b in zip(first, second, strict=True):
        assert a["train_loss"] == b["train_loss"]
        assert a["val_loss"] == b["val_loss"]
        assert a["val_top1"] == b["val_top1"]
    assert yaml.safe_load((rerun / "config.yaml").read_text()) == yaml.safe_load(
        (trained_run.dir / "config.yaml").read_text()
    )


def test_run_dir_names_count_up(tmp_path):
    names = [RunDir.create(tmp_path / "runs", "exp").path.name for _ in range(3)]
    assert names == ["exp", "exp-2", "exp-3"]
    assert RunDir.create(tmp_path / "runs", "other").path.name == "other"


def test_it_learns_the_coloured_squares(tmp_path, make_images, write_config, cli):
    train = make_images("train", per_class=8, seed=11)
    val = make_images("val", per_class=6, seed=12)
    cfg = small_config(tmp_path, train, val, experiment="learn", train={"epochs": 3})
    result = cli("finetune", write_config(cfg), "--quiet")
    assert result.exit_code == 0, result.output
    rows = metrics(tmp_path / "runs" / "learn")
    assert rows[-1]["val_top1"] >= 90  # chance is 33%
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # --quiet prints just the run dir and the best accuracy
    assert result.output.strip().startswith(str(tmp_path / "runs" / "learn"))
    assert "best val top-1" in result.output


def test_freeze_backbone_run_records_trainable_params(tmp_path, squares, write_config, cli):
    cfg = small_config(
        tmp_path, *squares, experiment="frozen", model={"freeze": "backbone"}, train={"epochs": 1}
    )
    result = cli("finetune", write_config(cfg), "train.batch_size=4")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "frozen" / "summary.json").read_text())
    assert summary["trainable_params"] == 96 * 3 + 3
    saved = yaml.safe_load((tmp_path / "runs" / "frozen" / "config.yaml").read_text())
    assert saved["train"]["batch_size"] == 4  # the override is part of the saved config
