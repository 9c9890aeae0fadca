"""Experiment tracking: MLflow (the flattened config as params, every metrics.jsonl row as
metrics by epoch, the run's files and model as artifacts) and TensorBoard (event files in the
run directory). Optional: ``pip install 'tlkd[tracking]'``. Only glue is written here: the
clients are MLflow's ``MlflowClient`` and torch's ``SummaryWriter``.

A run remembers its MLflow run in ``tracking.json``; a resume continues that MLflow run and
logs only the epochs it has not logged yet."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

from tlkd.config.loader import flatten
from tlkd.config.schema import Config
from tlkd.errors import ConfigError, TlkdError, first_line
from tlkd.run.rundir import RunDir, write_json

STATE = "tracking.json"
TENSORBOARD = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
# MLflow limits (mlflow.utils.validation): per log_batch call and per param value
_BATCH_PARAMS, _BATCH_METRICS, _PARAM_CHARS = 100, 1000, 6000
EXTRA = "pip install 'tlkd[tracking]'"


def check(cfg: Config) -> None:
    """Before anything runs: the tracking libraries the config asks for are installed."""
    t = cfg.tracking
    if t.mlflow is not False:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("tracking.mlflow", f"needs MLflow: {EXTRA}") from None
    if t.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("tracking.tensorboard", f"needs TensorBoard: {EXTRA}") from None


def mlflow_uri(cfg: Config) -> str:
    """The tracking URI: the one given, or an SQLite store in output_dir (MLflow 3 refuses
    its old file store by default; SQLite is its embedded default)."""
    if isinstance(cfg.tracking.mlflow, str):
        return cfg.tracking.mlflow
    return f"sqlite:///{(cfg.output_dir / MLFLOW_DB).resolve()}"


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class Tracker:
    """What one run sends to MLflow and TensorBoard (rank 0 only; a no-op when off)."""

    def __init__(self, cfg: Config, run: RunDir, mode: str) -> None:
        self.cfg, self.run, self.mode = cfg, run, mode
        self.client: Any = None
        self.run_id: str | None = None
        self.writer: Any = None
        self.state = self._load_state()

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.run.file(STATE).read_text())
        except (OSError, ValueError):
            return {}

    def _save_state(self) -> None:
        write_json(self.run.file(STATE), self.state)

    @property
    def active(self) -> bool:
        return self.client is not None or self.writer is not None

    def start(self, config: dict[str, Any], first_epoch: int) -> list[str]:
        """Open (or, on resume, reopen) the MLflow run and the TensorBoard writer; the plan
        lines saying where the run is tracked."""
        lines = []
        t = self.cfg.tracking
        # a resume from an older checkpoint (checkpoint.prev.pt) retrains epochs logged before
        logged = int(self.state.get("logged_epoch", -1))
        self.state["logged_epoch"] = min(logged, first_epoch - 1)
        if t.mlflow is not False:
            lines.append(self._start_mlflow(config))
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.run.file(TENSORBOARD)
            # purge_step: events a killed run wrote after its checkpoint are dropped
            self.writer = SummaryWriter(str(folder), purge_step=first_epoch)
            if first_epoch <= 1:
                self.writer.add_text("config", "```yaml\n" + _yaml(config) + "\n```", 0)
            lines.append(f"tracking    tensorboard: {folder} (tensorboard --logdir {folder})")
        return lines

    def _start_mlflow(self, config: dict[str, Any]) -> str:
        for name in ("mlflow", "alembic"):  # their INFO lines (database set-up) are noise here
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = self.state.get("mlflow_uri") or mlflow_uri(self.cfg)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self.run_id = self.state.get("mlflow_run_id")
            if self.run_id is not None:  # resume: the same MLflow run
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = self._create_run(uri)
                params = [
                    Param(k, json.dumps(v) if not isinstance(v, str) else v)
                    for k, v in flatten(config).items()
                    if v is not None and k
                ]
                params = [Param(p.key, p.value[:_PARAM_CHARS]) for p in params]
                for i in range(0, len(params), _BATCH_PARAMS):
                    self.client.log_batch(self.run_id, params=params[i : i + _BATCH_PARAMS])
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds (HTTP, SQL, ...)
            raise TlkdError(f"tracking.mlflow: cannot log to {uri}: {first_line(err)}") from None
        self.state.update(mlflow_uri=uri, mlflow_run_id=self.run_id)
        self._save_state()
        return f"tracking    mlflow: run {self.run_id} at {uri}"

    def _create_run(self, uri: str) -> str:
        name = self.cfg.tracking.experiment or self.cfg.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a local store keeps its artifacts beside it, not in the working directory
            artifacts = (
                (self.cfg.output_dir / MLFLOW_ARTIFACTS).resolve().as_uri()
                if self.cfg.tracking.mlflow is True
                else None
            )
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        run = self.client.create_run(
            experiment_id,
            run_name=self.run.path.name,
            tags={"tlkd.mode": self.mode, "tlkd.run_dir": str(self.run.path)},
        )
        return run.info.run_id

    def epochs(self, history: list[dict[str, Any]]) -> None:
        """Log every history row not logged yet (step = epoch)."""
        done = int(self.state.get("logged_epoch", -1))
        rows = [r for r in history if int(r["epoch"]) > done]
        if not rows or not self.active:
            return
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [
                Metric(k, v, now, int(r["epoch"]))
                for r in rows
                for k, v in _numbers(r).items()
                if k != "epoch"
            ]
            try:
                for i in range(0, len(metrics), _BATCH_METRICS):
                    self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH_METRICS])
            except Exception as err:  # noqa: BLE001
                raise TlkdError(f"tracking.mlflow: cannot log metrics: {first_line(err)}") from None
        if self.writer is not None:
            for r in rows:
                for k, v in _numbers(r).items():
                    if k != "epoch":
                        self.writer.add_scalar(k, v, int(r["epoch"]))
            self.writer.flush()
        self.state["logged_epoch"] = int(rows[-1]["epoch"])
        self._save_state()

    def finish(self, summary: dict[str, Any] | None, status: str = "FINISHED") -> None:
        """The run's files and model as artifacts, the summary's scores, the final status."""
        if self.client is not None:
            try:
                if summary is not None:
                    self._artifacts(summary)
                self.client.set_terminated(self.run_id, status=status)
            except Exception as err:  # noqa: BLE001
                raise TlkdError(
                    f"tracking.mlflow: cannot finish the run: {first_line(err)}"
                ) from None
        if self.writer is not None:
            self.writer.close()

    def _artifacts(self, summary: dict[str, Any]) -> None:
        scores = {
            k: summary[k]
            for k in ("best_val_top1", "best_epoch", "final_val_top1", "wall_time_s")
            if isinstance(summary.get(k), int | float)
        }
        for k, v in scores.items():
            self.client.log_metric(self.run_id, k, float(v))
        for name in ("config.yaml", "summary.json", "metrics.jsonl", "curves.png", "README.md"):
            path = self.run.file(name)
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        weights = self.run.file("model.safetensors")
        if weights.is_file():
            self.client.log_artifact(self.run_id, str(weights), artifact_path="model")


def _yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False).rstrip()
