"""tlkd sweep: every combination runs once; an interrupted sweep completes when rerun."""

import csv
import json
import signal
import subprocess
import sys

from conftest import tlkd_env

from tlkd.recipes.sweep import _groups, _run_name, parse_grid


def test_grid_parsing_and_run_names():
    grid = parse_grid(
        ["distill.losses.0.temperature=1,2.5", "seed=0,1", "data.classes=[a,b],[c,d]"]
    )
    assert grid == {
        "distill.losses.0.temperature": [1, 2.5],
        "seed": [0, 1],
        "data.classes": [["a", "b"], ["c", "d"]],
    }
    assert _run_name({"distill.losses.0.temperature": 4, "seed": 1}) == "temperature-4_seed-1"


def test_sweep_groups_are_compares_mean_over_seeds():
    rows = [
        {"run": f"lr-{lr}_seed-{seed}", "lr": lr, "seed": seed, "status": "finished",
         "final_val_top1": final, "best_val_top1": None if lr == 0.2 else final + 1}
        for lr, seed, final in [(0.1, 0, 80.0), (0.1, 1, 82.0), (0.2, 0, 70.0), (0.2, 1, 71.0)]
    ]  # fmt: skip
    groups = _groups(rows, {"lr": [0.1, 0.2], "seed": [0, 1]})
    assert groups == [
        {"lr": 0.1, "runs": 2, "final_val_top1": "81.00 ± 1.41", "best_val_top1": "82.00 ± 1.41"},
        {"lr": 0.2, "runs": 2, "final_val_top1": "70.50 ± 0.71", "best_val_top1": "-"},
    ]
    # no seed in the grid (rows have no seed): one run per cell, its value alone
    unseeded = {k: v for k, v in rows[0].items() if k != "seed"}
    groups = _groups([unseeded], {"lr": [0.1]})
    assert groups == [{"lr": 0.1, "runs": 1, "final_val_top1": "80.00", "best_val_top1": "81.00"}]


def test_interrupted_sweep_completes_and_skips_finished_runs(tmp_path, tiny_config):
    config = tiny_config(sweep={"grid": {"train.optimizer.lr": [0.01, 0.02]}})
    args = [sys.executable, "-m", "tlkd", "sweep", str(config), "--grid", "seed=0,1"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=tlkd_env(), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # kill the sweep as its second run starts
        if line.startswith("[2/4]"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate()
    root = tmp_path / "runs" / "tiny-sweep"
    first = root / "lr-0.01_seed-0"
    assert json.loads((first / "summary.json").read_text())["status"] == "finished"
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    done = subprocess.run(args, cwd=tmp_path, env=tlkd_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "[1/4] lr-0.01_seed-0: finished" in done.stdout  # skipped, not rerun
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    with open(root / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [
        "lr-0.01_seed-0",
        "lr-0.01_seed-1",
        "lr-0.02_seed-0",
        "lr-0.02_seed-1",
    ]
    assert all(r["status"] == "finished" for r in rows)
    groups = json.loads((root / "sweep.json").read_text())["groups"]
    assert [g["runs"] for g in groups] == [2, 2] and all("±" in g["final_val_top1"] for g in groups)
    # each run's config is the base with its overrides, and no sweep block
    cfg = (root / "lr-0.02_seed-1" / "config.yaml").read_text()
    assert "lr: 0.02" in cfg and "seed: 1" in cfg and "sweep: null" in cfg
    # a sweep's finished runs keep no checkpoint (train.keep_checkpoint: false by default)
    assert "keep_checkpoint: false" in cfg
    assert sorted(root.glob("*/checkpoint*.pt")) == []
    assert all((root / r["run"] / "README.md").is_file() for r in rows)


def test_sweep_typo_fails_before_any_run(tmp_path, tiny_config, run_cli):
    proc = run_cli("sweep", tiny_config(), "--grid", "train.optimiser.lr=0.1,0.2")
    assert proc.returncode == 2 and "did you mean 'optimizer'" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_sweep_picks_the_mode_from_the_config():
    from tlkd.config.loader import validate
    from tlkd.recipes.modes import MODES, mode_of

    assert list(MODES) == ["finetune", "distill", "adapt", "pretrain"]
    assert mode_of(validate({})) == "finetune"
    assert mode_of(validate({"teacher": {"name": "t"}})) == "distill"
    assert mode_of(validate({"distill": {}})) == "distill"
    assert mode_of(validate({"adapt": {"method": "adabn"}})) == "adapt"
    assert mode_of(validate({"pretrain": {}})) == "pretrain"


def test_sweep_runs_an_adapt_config(tmp_path, make_images, write_config, run_cli):
    from conftest import small_config

    source, val = make_images("source", per_class=4), make_images("target_val", per_class=2)
    target = make_images("target", per_class=4)
    cfg = small_config(tmp_path, source, val, experiment="ada", train={"epochs": 0})
    cfg["data"]["unlabeled"] = str(target)
    cfg["adapt"] = {"method": "adabn"}  # statistics only: no training
    proc = run_cli("sweep", write_config(cfg), "--grid", "seed=0,1")
    assert proc.returncode == 0, proc.stderr
    for seed in (0, 1):
        summary = json.loads(
            (tmp_path / "runs/ada-sweep" / f"seed-{seed}/summary.json").read_text()
        )
        assert summary["mode"] == "adapt" and summary["status"] == "finished"


def test_sweep_runs_a_pretrain_config(tmp_path, make_images, write_config, run_cli):
    from conftest import small_config

    images, val = make_images("images", per_class=4), make_images("val", per_class=2)
    cfg = small_config(tmp_path, None, val, experiment="ssl", train={"epochs": 1})
    cfg["data"]["unlabeled"] = str(images)
    cfg["pretrain"] = {"knn_k": 3}
    proc = run_cli("sweep", write_config(cfg), "--grid", "pretrain.temperature=0.2,0.5")
    assert proc.returncode == 0, proc.stderr
    for t in ("0.2", "0.5"):
        run = tmp_path / "runs/ssl-sweep" / f"temperature-{t}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["mode"] == "pretrain" and summary["status"] == "finished"
        assert f"temperature: {t}" in (run / "config.yaml").read_text()
        # each run's start-up is its own: built after the sweep's checks, nothing imported
        startup = summary["startup_s"]
        assert {"data", "model", "loaders", "to_first_step"} <= startup.keys()
        assert "imports" not in startup and startup["to_first_step"] < 60


def test_sweep_bad_combination_fails_before_any_run(tmp_path, tiny_config, run_cli):
    from conftest import error_line

    # valid schema, but a model timm does not know: found by the dry run of that combination
    proc = run_cli("sweep", tiny_config(), "--grid", "model.name=test_resnet,no_such_net")
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc)
    assert "sweep run name-nosuchnet (model.name=no_such_net)" in line and "model.name" in line
    assert not (tmp_path / "runs").exists()
    # a value the schema refuses, in one combination of two keys
    proc = run_cli("sweep", tiny_config(), "--grid", "train.epochs=1,-1", "--grid", "seed=0,1")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "sweep run epochs--1_seed-0" in line and "train.epochs" in line
    assert not (tmp_path / "runs").exists()
