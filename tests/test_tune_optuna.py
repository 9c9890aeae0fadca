"""tlkd tune on Optuna: trials are run directories, the best config is written, pruning
marks trials, bad spaces fail before any trial, and two workers on one storage share the
budget with no trial run twice."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import error_line, tlkd_env

optuna = pytest.importorskip("optuna")

SPACE = {"train.optimizer.lr": {"log": [1.0e-3, 3.0e-2]}, "train.batch_size": [4, 8]}


def tune_config(tiny_config, **tune):
    return tiny_config(train={"epochs": 2}, tune={"space": SPACE, "pruner": "none", **tune})


def test_tune_runs_trials_and_writes_the_best_config(tmp_path, tiny_config, run_cli):
    proc = run_cli("tune", tune_config(tiny_config), "--trials", "3")
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "runs" / "tiny-tune"
    result = json.loads((root / "tune.json").read_text())
    assert [t["trial"] for t in result["trials"]] == [0, 1, 2]
    values = {}
    for t in result["trials"]:
        run = root / f"trial-{t['trial']:04d}"
        summary = json.loads((run / "summary.json").read_text())
        assert t["state"] == "complete" and summary["status"] == "finished"
        assert t["best_val_top1"] == pytest.approx(summary["best_val_top1"])
        cfg = (run / "config.yaml").read_text()
        assert f"batch_size: {t['train.batch_size']}" in cfg
        assert not list(run.glob("checkpoint*"))  # trials keep weights, not training states
        values[t["trial"]] = summary["best_val_top1"]
    best = result["best"]
    assert best["best_val_top1"] == max(values.values())
    # best.yaml is the best trial's config: it validates and names the trial's values
    from tlkd.config.loader import load_config

    cfg = load_config(root / "best.yaml")
    assert cfg.train.batch_size == best["params"]["train.batch_size"]
    assert cfg.train.optimizer.lr == pytest.approx(best["params"]["train.optimizer.lr"])
    with open(root / "tune.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (root / "tune.png").is_file() and (root / "optuna.db").is_file()
    # the same command again: the study already holds its 3 trials, nothing more runs
    again = run_cli("tune", tune_config(tiny_config), "--trials", "3")
    assert again.returncode == 0 and "[trial" not in again.stdout


def test_pruned_trials_are_marked(tmp_path, tiny_config, run_cli, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    proc = run_cli("tune", tune_config(tiny_config, pruner="median"), "--trials", "2")
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "runs" / "tiny-tune"
    states = [t["state"] for t in json.loads((root / "tune.json").read_text())["trials"]]
    assert states == ["complete", "pruned"]
    summary = json.loads((root / "trial-0001" / "summary.json").read_text())
    assert summary["status"] == "pruned" and summary["epochs_done"] == 1
    assert not list((root / "trial-0001").glob("checkpoint*"))  # like a finished trial


def test_tune_errors_come_before_any_trial(tmp_path, tiny_config, run_cli):
    proc = run_cli("tune", tiny_config(), "--trials", "2")
    assert proc.returncode == 2 and "tune" in error_line(proc)
    bad = tiny_config(tune={"space": {"train.optimizer.lrr": [0.1]}})
    proc = run_cli("tune", bad, "--trials", "2")
    line = error_line(proc)
    assert proc.returncode == 2 and "train.optimizer.lrr" in line and "lr" in line
    proc = run_cli("tune", tune_config(tiny_config))
    assert proc.returncode == 2 and "--trials" in error_line(proc)
    proc = run_cli("tune", tune_config(tiny_config, metric="best_val_top"), "--trials", "2")
    line = error_line(proc)
    assert proc.returncode == 2 and "tune.metric" in line and "best_val_top1" in line
    assert not (tmp_path / "runs" / "tiny-tune").exists()


def test_two_workers_on_one_storage_share_the_budget(tmp_path, tiny_config):
    config = tune_config(tiny_config, sampler="random")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    # the storage's tables first: two processes creating a new SQLite schema at once race
    optuna.create_study(storage=storage, study_name="shared", direction="maximize")
    args = [sys.executable, "-m", "tlkd", "tune", str(config), "--trials", "5"]
    args += ["--storage", storage, "--study", "shared", "-q"]
    workers = [
        subprocess.Popen(args, cwd=tmp_path, env=tlkd_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    study = optuna.load_study(study_name="shared", storage=storage)
    ran = [t for t in study.trials if t.user_attrs.get("tlkd") is None]
    assert len(ran) == 5 and all(t.state.name == "COMPLETE" for t in ran)
    dirs = [t.user_attrs["run_dir"] for t in ran]
    assert len(set(dirs)) == 5  # no trial ran twice
    root = tmp_path / "runs" / "tiny-tune"
    assert sorted(p.name for p in root.glob("trial-*")) == sorted(d.split("/")[-1] for d in dirs)
    assert all("best trial" in out for out, _ in outs)  # each printed the study's best
