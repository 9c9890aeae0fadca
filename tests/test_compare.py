"""tlkd compare: per-run rows and mean ± std over runs that differ only in seed."""

import json

import yaml

from tlkd.recipes.compare import compare


def _fake_run(root, name, seed, lr, final):
    run = root / name
    run.mkdir()
    config = {
        "experiment": name,
        "seed": seed,
        "output_dir": str(root),
        "train": {"optimizer": {"lr": lr}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {
        "mode": "finetune",
        "model": "m",
        "status": "finished",
        "best_val_top1": final + 1,
        "final_val_top1": final,
        "params": 10,
        "wall_time_s": 1.0,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_groups_runs_that_differ_only_in_seed(tmp_path):
    runs = [
        _fake_run(tmp_path, "a-s0", 0, 0.1, 80.0),
        _fake_run(tmp_path, "a-s1", 1, 0.1, 82.0),
        _fake_run(tmp_path, "b-s0", 0, 0.2, 70.0),
    ]
    result = compare(runs)
    assert [r["final_val_top1"] for r in result["runs"]] == [80.0, 82.0, 70.0]
    groups = {g["runs"]: g for g in result["groups"]}
    assert groups["a-s0, a-s1"]["final_val_top1"] == "81.00 ± 1.41"
    assert groups["a-s0, a-s1"]["seeds"] == 2
    assert groups["b-s0"]["final_val_top1"] == "70.00"


def test_repeats_of_one_seed_are_not_two_seeds(tmp_path, capsys):
    from tlkd.recipes.compare import print_tables

    runs = [
        _fake_run(tmp_path, "a", 0, 0.1, 80.0),
        _fake_run(tmp_path, "a-2", 0, 0.1, 82.0),  # the same experiment, run again
    ]
    result = compare(runs)
    (group,) = result["groups"]
    assert group["seeds"] == 1 and group["n_runs"] == 2
    assert group["final_val_top1"] == "81.00"  # a mean of the repeats, no seed std
    assert "±" not in group["best_val_top1"]
    print_tables(result)
    out = capsys.readouterr().out
    assert "2 runs, 1 seed" in out and "81.00 ±" not in out


def test_repeated_seeds_are_averaged_before_the_seed_std(tmp_path):
    runs = [
        _fake_run(tmp_path, "s0", 0, 0.1, 80.0),
        _fake_run(tmp_path, "s0-again", 0, 0.1, 82.0),
        _fake_run(tmp_path, "s1", 1, 0.1, 83.0),
    ]
    (group,) = compare(runs)["groups"]
    assert group["seeds"] == 2 and group["n_runs"] == 3
    # seeds 0 (mean 81) and 1 (83): 82 ± 1.41, not the std of three values
    assert group["final_val_top1"] == "82.00 ± 1.41"


def test_cli_compare_rejects_non_runs(tmp_path):
    from typer.testing import CliRunner

    from tlkd.cli import app

    result = CliRunner().invoke(app, ["compare", str(tmp_path)])
    assert result.exit_code == 2
