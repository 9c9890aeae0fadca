"""A finished run keeps one checkpoint (none with train.keep_checkpoint: false) and writes a
model card, README.md, whose plain-timm snippet loads the weights."""

from __future__ import annotations

import json
import re

import torch
from conftest import error_line
from safetensors.torch import load_file


def finished(tmp_path, name: str = "tiny") -> tuple:
    run = tmp_path / "runs" / name
    return run, json.loads((run / "summary.json").read_text())


def test_finished_run_keeps_one_checkpoint_and_a_card_that_loads_in_plain_timm(
    tmp_path, tiny_config, run_cli
):
    config = tiny_config()
    proc = run_cli("finetune", config, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    run, summary = finished(tmp_path)
    # the crash-safety copy is gone once the run is finished; the resumable one stays
    assert not (run / "checkpoint.prev.pt").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert summary["checkpoint_kept"] is True
    assert summary["command"] == f"tlkd finetune {config} train.epochs=2"
    card = (run / "README.md").read_text()
    assert f"# {summary['experiment']}" in card
    assert "blue, green, red" in card
    assert f"{summary['best_val_top1']:.2f}%" in card
    assert summary["command"] in card
    assert f"tlkd finetune {run}/config.yaml" in card
    assert "16 px (crop_pct 1.0, bilinear interpolation)" in card
    # the card's Python block, run as it is, builds the model with plain timm and loads it
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the snippet the card gives users
    model = scope["model"]
    saved = load_file(run / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_resume_keeps_the_first_command(tmp_path, tiny_config, run_cli):
    config = tiny_config()
    assert run_cli("finetune", config, "train.epochs=1").returncode == 0
    run, _ = finished(tmp_path)
    proc = run_cli("finetune", "--resume", run, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    _, summary = finished(tmp_path)
    assert summary["epochs_done"] == 2
    assert summary["command"] == f"tlkd finetune {config} train.epochs=1"


def test_keep_checkpoint_false_leaves_no_checkpoint_and_resume_says_why(
    tmp_path, tiny_config, run_cli
):
    config = tiny_config(train={"keep_checkpoint": False, "epochs": 1})
    assert run_cli("finetune", config).returncode == 0
    run, summary = finished(tmp_path)
    assert sorted(p.name for p in run.glob("checkpoint*")) == []
    assert summary["checkpoint_kept"] is False and (run / "model.safetensors").is_file()
    proc = run_cli("finetune", "--resume", run, "train.epochs=2")
    assert proc.returncode == 1
    assert "keep_checkpoint: false" in error_line(proc)


def test_card_of_an_mlp_head_says_timm_cannot_build_it(tmp_path, tiny_config, run_cli):
    config = tiny_config(model={"head": {"hidden": [8]}}, train={"epochs": 1})
    assert run_cli("finetune", config).returncode == 0
    run, _ = finished(tmp_path)
    card = (run / "README.md").read_text()
    assert "```python" not in card
    assert f"model.pretrained: {run}" in card


def test_a_run_saved_before_newer_keys_resumes(tmp_path, tiny_config, run_cli):
    """config.yaml of a run made by an older tlkd lacks the keys added since: they count as
    their defaults, so the resume is not refused as a different experiment."""
    import yaml

    assert run_cli("finetune", tiny_config(), "train.epochs=1").returncode == 0
    run, _ = finished(tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["tracking"], saved["train"]["keep_checkpoint"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    proc = run_cli("finetune", "--resume", run, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    # a real difference is still refused
    proc = run_cli("finetune", "--resume", run, "train.epochs=3", "train.batch_size=4")
    assert proc.returncode == 2 and "train.batch_size" in error_line(proc)
