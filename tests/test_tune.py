"""``precision: auto`` / ``channels_last: auto``: timed on the CPU, recorded in the run."""

from __future__ import annotations

import json

import torch
import yaml
from conftest import small_config

from tlkd.engine import tune


def test_auto_times_the_candidates_and_records_the_choice(tmp_path, squares, write_config, run_cli):
    train, val = squares
    cfg = small_config(tmp_path, train, val, train={"epochs": 1, "precision": "auto"})
    cfg["train"]["channels_last"] = "auto"
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")  # nothing measured before
    proc = run_cli("finetune", write_config(cfg), "experiment=auto")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("auto "))
    assert "fp32 " in line and "fp32+cl" in line and "steps/s" in line
    saved = yaml.safe_load((tmp_path / "runs" / "auto" / "config.yaml").read_text())
    saved = saved["resolved"]
    assert saved["train.precision"] in ("fp32", "bf16")
    assert isinstance(saved["train.channels_last"], bool)
    summary = json.loads((tmp_path / "runs" / "auto" / "summary.json").read_text())
    assert summary["precision"] == ("bfloat16" if saved["train.precision"] == "bf16" else "fp32")
    # the next run reuses the measurement
    proc = run_cli("finetune", write_config(cfg), "experiment=again")
    assert "measured before" in proc.stdout, proc.stdout
    again = yaml.safe_load((tmp_path / "runs" / "again" / "config.yaml").read_text())
    assert again["resolved"]["train.precision"] == saved["train.precision"]


def test_fixed_settings_are_not_timed_and_a_clear_winner_is_chosen(monkeypatch, tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    model(torch.zeros(1, 3, 8, 8))
    calls = []

    def fake(model, batch, dtype, channels_last, train, steps=3, **_):
        if steps > 1:  # not the one step that sizes the batch
            calls.append((dtype, channels_last))
        return 0.5 if (dtype is torch.bfloat16 and channels_last) else 1.0

    monkeypatch.setattr(tune, "step_time", fake)
    monkeypatch.setattr(tune, "cpu_bf16_supported", lambda: True)
    cpu, shape = torch.device("cpu"), (2, 3, 8, 8)
    cache = tmp_path / "cache"
    assert tune.choose("fp32", False, model, cpu, shape, True, print, cache) == ("fp32", False)
    assert calls == []
    assert tune.choose("auto", "auto", model, cpu, shape, True, print, cache) == ("bf16", True)
    assert len(calls) == 4
    # measured once: the next run with the same model and shapes reuses the choice
    assert tune.choose("auto", "auto", model, cpu, shape, True, print, cache) == ("bf16", True)
    assert len(calls) == 4
    # within the margin the plain setting stays
    monkeypatch.setattr(tune, "step_time", lambda *a, **k: 1.0 if a[2] is None else 0.95)
    assert tune.choose("auto", False, model, cpu, shape, True, print, cache) == ("fp32", False)


def test_a_large_model_is_timed_on_a_smaller_batch(monkeypatch, tmp_path):
    """Measuring stays bounded: a batch whose plain step would take long is cut down."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    sizes = []

    def fake(model, batch, dtype, channels_last, train, steps=3, **_):
        sizes.append(len(batch))
        return 0.1 * len(batch)  # 0.1 s an image

    monkeypatch.setattr(tune, "step_time", fake)
    monkeypatch.setattr(tune, "cpu_bf16_supported", lambda: True)
    shape = (128, 3, 8, 8)
    tune.choose("auto", "auto", model, torch.device("cpu"), shape, True, print, tmp_path)
    assert sizes[0] == 4  # the sizing step
    assert sizes[1:] == [int(tune.STEP_BUDGET_S / 0.1)] * 4


def test_a_dry_run_measures_nothing(tmp_path, squares, write_config, run_cli):
    train, val = squares
    cfg = small_config(tmp_path, train, val, train={"epochs": 1, "precision": "auto"})
    cfg["train"]["channels_last"] = "auto"
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    proc = run_cli("finetune", write_config(cfg), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "measured" not in proc.stdout.replace("measured when the run starts", "")
    assert not (tmp_path / "cache" / tune.TUNE_FILE).exists()
    if tune.cpu_bf16_supported():
        assert "precision auto (measured when the run starts)" in proc.stdout
