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


def test_cli_compare_rejects_non_runs(tmp_path):
    from typer.testing import CliRunner

    from tlkd.cli import app

    result = CliRunner().invoke(app, ["compare", str(tmp_path)])
    assert result.exit_code == 2
