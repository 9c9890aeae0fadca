"""train.compile: the auto rule, the plan line, and a compiled run that trains and resumes
exactly (the compiled model's weights are the plain model's: checkpoints need no renaming)."""

import json

import torch
from safetensors.torch import load_file

from tlkd.engine.tune import compile_rule


def test_auto_rule_compiles_only_long_runs_on_a_gpu(monkeypatch):
    from tlkd.engine import tune

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on, why = compile_rule(cpu, 10**6)
    assert not on and "on cpu" in why
    monkeypatch.setattr(tune, "_compiler_available", lambda device: False)
    on, why = compile_rule(cuda, 10**5)
    assert not on and "no Triton" in why
    monkeypatch.setattr(tune, "_compiler_available", lambda device: True)
    on, why = compile_rule(cuda, 100)
    assert not on and "100 steps" in why
    assert compile_rule(cuda, 10**5)[0]


def test_plan_shows_the_compile_choice(tiny_config, run_cli):
    result = run_cli("finetune", tiny_config(), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "compile false" in result.stdout
    assert "default     compile: false (on cpu" in result.stdout


def _weights(run):
    return load_file(run / "model.safetensors")


def test_compiled_run_trains_and_resumes_exactly(tmp_path, tiny_config, cli):
    """Two epochs straight against one epoch then --resume for the second, both compiled.
    In one process the second compilation comes from torch's caches (about a minute for the
    first on a 2-core CPU)."""
    from torch._dynamo.utils import counters

    sections = dict(train={"epochs": 2, "batch_size": 8, "compile": True})
    straight = tiny_config("straight.yaml", experiment="straight", **sections)
    frames = counters["stats"]["unique_graphs"]
    assert cli("finetune", straight).exit_code == 0
    assert counters["stats"]["unique_graphs"] > frames  # the training steps ran compiled
    runs = tmp_path / "runs"
    summary = json.loads((runs / "straight" / "summary.json").read_text())
    assert summary["compile"] is True and summary["status"] == "finished"
    # the start-up clock, from the command's start to the first (compiled) step
    assert {"config", "imports", "data", "model", "to_first_step"} <= summary["startup_s"].keys()
    start = load_file(runs / "straight" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in start.values())

    one = tiny_config("cut.yaml", experiment="cut", train={**sections["train"], "epochs": 1})
    assert cli("finetune", one).exit_code == 0
    result = cli("finetune", "--resume", runs / "cut", "train.epochs=2")
    assert result.exit_code == 0, result.output
    a, b = _weights(runs / "straight"), _weights(runs / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("_orig_mod") for k in a)  # the plain model's names
    rows = [json.loads(x) for x in (runs / "cut" / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(x) for x in (runs / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in first]
