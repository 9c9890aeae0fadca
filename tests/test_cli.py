"""`python -m tlkd` as a user runs it: exit codes, one-line errors on stderr, --dry-run.

Exit codes: 0 success, 2 a config that cannot run, 1 a failure while running. A real process
(``run_tlkd``) where the process itself is under test (a config error before torch loads, the
offline hub, a whole dry run); the same app in this process (``run_cli``, the same exit code,
stdout and stderr) where only the message is.
"""

from __future__ import annotations

import shutil

import timm
import torch
from conftest import MODEL, error_line


def test_config_error_is_one_line_exit_2(tiny_config, run_tlkd):
    proc = run_tlkd("finetune", tiny_config(train={"epoch": 3}))
    assert proc.returncode == 2
    line = error_line(proc)
    assert "unknown key 'train.epoch'" in line and "did you mean 'epochs'?" in line


def test_missing_config_file_is_exit_2(tmp_path, run_tlkd):
    proc = run_tlkd("finetune", tmp_path / "nope.yaml")
    assert proc.returncode == 2
    assert "config file not found" in error_line(proc)


def test_unknown_model_name_suggests_exit_2(tiny_config, run_cli):
    proc = run_cli("finetune", tiny_config(), "model.name=resnet181")
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: model.name: ")
    assert "did you mean 'resnet18'?" in line


def test_missing_data_path_is_exit_2(tiny_config, tmp_path, run_cli):
    proc = run_cli("finetune", tiny_config(), f"data.train={tmp_path / 'missing'}")
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: data.train: ")
    assert "missing" in line


def test_empty_class_folder_is_exit_2(tiny_config, squares, run_cli):
    train, _ = squares
    shutil.rmtree(train / "green")
    (train / "green").mkdir()
    proc = run_cli("finetune", tiny_config(), "data.val=null")
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: data.train: ")
    assert "green" in line


def test_num_classes_disagreeing_with_data_is_exit_2(tiny_config, run_cli):
    proc = run_cli("finetune", tiny_config(), "model.num_classes=5")
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: model.num_classes: ")
    assert "3 classes" in line


def test_unknown_class_in_subset_is_exit_2(tiny_config, run_cli):
    proc = run_cli("finetune", tiny_config(), "data.classes=[red,grene]")
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: data.classes: ")
    assert "did you mean 'green'?" in line


def test_pretrained_hub_weights_offline_is_one_line_error(tiny_config, run_tlkd):
    proc = run_tlkd("finetune", tiny_config(), "model.pretrained=true")
    assert proc.returncode != 0
    line = error_line(proc)
    assert "offline" in line.lower()
    assert "local weights file" in line


def test_dry_run_prints_plan_and_writes_nothing(tiny_config, tmp_path, run_tlkd):
    config = tiny_config(model={"freeze": "backbone"})
    proc = run_tlkd("finetune", config, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    model = timm.create_model(MODEL, num_classes=3)
    total = sum(p.numel() for p in model.parameters())
    trainable = model.fc.weight.numel() + model.fc.bias.numel()
    assert f"{total:,} total, {trainable:,} trainable, {total - trainable:,} frozen" in proc.stdout
    assert "24 train images, 12 val images" in proc.stdout
    assert "dry run" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_freeze_typo_caught_by_dry_run(tiny_config, tmp_path, run_cli):
    proc = run_cli("finetune", tiny_config(), "model.freeze=[layr1]", "--dry-run")
    assert proc.returncode == 2
    assert "did you mean 'layer1'?" in error_line(proc)
    assert not (tmp_path / "runs").exists()


# --- in-process (typer's CliRunner) ------------------------------------------------------------


def test_no_arguments_shows_help(cli):
    result = cli()
    assert "finetune" in result.output and "evaluate" in result.output


def test_version_command(cli):
    import tlkd

    result = cli("version")
    assert result.exit_code == 0
    assert f"tlkd {tlkd.__version__}" in result.output
    assert f"timm {timm.__version__}" in result.output


def test_failure_while_running_is_exit_1(tiny_config, tmp_path, cli):
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"  # a weights file cut short (a text file: exit 2)
    save_file({"w": torch.zeros(1000)}, str(junk))
    junk.write_bytes(junk.read_bytes()[:200])
    result = cli("finetune", tiny_config(), f"model.pretrained={junk}")
    assert result.exit_code == 1
    assert "cannot read weights" in in_process_error(result)


def in_process_error(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_override_is_exit_2(tiny_config, cli):
    result = cli("finetune", tiny_config(), "train.epochs=zero")
    assert result.exit_code == 2
    assert in_process_error(result).startswith("error: train.epochs: ")
    result = cli("finetune", tiny_config(), "train.epochs")
    assert result.exit_code == 2
    assert "key.path=value" in in_process_error(result)


def test_evaluate_non_run_is_exit_2(tmp_path, cli):
    result = cli("evaluate", tmp_path, "--no-speed")
    assert result.exit_code == 2
    assert "not a tlkd run directory" in in_process_error(result)


def test_relative_teacher_path_is_saved_absolute_and_resumes_elsewhere(
    trained_run, tmp_path, squares, write_config, cli, monkeypatch
):
    import os

    import yaml
    from conftest import small_config

    train, val = squares
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    teacher = os.path.relpath(trained_run.dir, work)  # relative to the working directory
    cfg = small_config(tmp_path, train, val, experiment="kd", train={"epochs": 1})
    cfg["teacher"] = {"name": MODEL, "pretrained": teacher}
    result = cli("distill", write_config(cfg, "kd.yaml"), "-q")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "kd"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["teacher"]["pretrained"] == str(trained_run.dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative path would now point nowhere
    result = cli("distill", "--resume", run, "train.epochs=2", "-q")
    assert result.exit_code == 0, result.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
