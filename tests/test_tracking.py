"""tracking: MLflow gets the config as params, every epoch's metrics, the files and model as
artifacts, one MLflow run across a resume; TensorBoard event files in the run directory;
missing libraries and bad URIs are config errors."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import error_line

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def metrics_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_mlflow_local_store_gets_params_metrics_artifacts_and_one_run_across_resume(
    tmp_path, tiny_config, run_cli
):
    from mlflow.tracking import MlflowClient

    config = tiny_config(tracking={"mlflow": True})
    proc = run_cli("finetune", config, "train.epochs=1")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "tiny"
    state = json.loads((run / "tracking.json").read_text())
    assert state["mlflow_uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert f"tracking    mlflow: run {state['mlflow_run_id']}" in proc.stdout
    proc = run_cli("finetune", "--resume", run, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert (
        json.loads((run / "tracking.json").read_text())["mlflow_run_id"] == state["mlflow_run_id"]
    )

    client = MlflowClient(tracking_uri=state["mlflow_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 1  # the resume continued the same MLflow run
    mlrun = runs[0]
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "tiny"
    assert mlrun.data.params["train.batch_size"] == "8"
    assert mlrun.data.params["model.name"] == "test_resnet"
    rows = metrics_rows(run)
    history = client.get_metric_history(mlrun.info.run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_top1"]) for r in rows]
    assert len(client.get_metric_history(mlrun.info.run_id, "train_loss")) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert mlrun.data.metrics["best_val_top1"] == pytest.approx(summary["best_val_top1"])
    files = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "summary.json", "metrics.jsonl", "README.md", "model"} <= files
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id, "model")] == [
        "model/model.safetensors"
    ]
    # the local store keeps its artifacts beside it, not in the working directory
    assert (tmp_path / "runs" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_tensorboard_event_files_hold_every_epoch(tmp_path, tiny_config, run_cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tracking={"tensorboard": True})
    proc = run_cli("finetune", config, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "tiny"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("val_top1")]
    want = [(r["epoch"], r["val_top1"]) for r in metrics_rows(run)]
    assert [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want])


def test_tracking_config_errors(tmp_path, tiny_config, run_cli, monkeypatch):
    proc = run_cli("finetune", tiny_config(tracking={"mlflow": "nowhere"}), "--dry-run")
    assert proc.returncode == 2 and "tracking.mlflow" in error_line(proc)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    proc = run_cli("finetune", tiny_config(tracking={"mlflow": True}), "--dry-run")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "tracking.mlflow" in line and "pip install 'tlkd[tracking]'" in line
    assert not (tmp_path / "runs").exists()


def test_a_tracking_failure_mid_run_is_a_warning(tmp_path, tiny_config, run_cli, monkeypatch):
    from tlkd.errors import TlkdError
    from tlkd.run.tracking import Tracker

    def down(self, history):
        if history:  # up at the start, down once epochs come in
            raise TlkdError("tracking.mlflow: cannot log metrics: server down")

    monkeypatch.setattr(Tracker, "epochs", down)
    proc = run_cli("finetune", tiny_config(tracking={"tensorboard": True}), "train.epochs=1")
    assert proc.returncode == 0, proc.stderr
    assert "warning     tracking.mlflow: cannot log metrics: server down" in proc.stdout
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["status"] == "finished"
