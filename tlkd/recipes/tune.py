"""tune: hyperparameter search on Optuna. Each trial is a normal run directory
(``<output_dir>/<experiment>-tune/trial-NNNN``) of the mode the config asks for, with the
``tune.space`` values as overrides; val top-1 is reported to Optuna every epoch for pruning.

The study lives in an Optuna storage: by default an SQLite file in the tune folder (embedded,
no server); several processes or machines given the same ``--storage`` URL (an RDB such as
PostgreSQL) and study name share one study and its trial budget, which is how a search
outgrows one machine. Trials are numbered by the storage, so no trial runs twice; a trial
numbered at or past the budget (several workers asking at once) is closed unrun."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tlkd.config import safe_yaml
from tlkd.config.loader import load_config
from tlkd.config.schema import Config
from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError, TlkdError, first_line, is_stop
from tlkd.recipes.modes import mode_of, recipe
from tlkd.recipes.runner import EPOCH_HOOKS
from tlkd.run.rundir import CONFIG, SUMMARY, RunDir, write_json, write_text

TUNE_DB = "optuna.db"
OVER_BUDGET = "over budget: closed unrun"


class Pruned(TlkdError):
    """Optuna's pruner stopped this trial after an epoch."""

    tracking_status = "KILLED"  # MLflow has no "pruned": a run stopped on purpose


# numbers every run's summary.json holds (a mode may add more: any number there works)
METRICS = ("best_val_top1", "final_val_top1", "final_val_top5", "wall_time_s", "peak_rss_mb")


def _require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError(None, "tlkd tune needs Optuna: pip install 'tlkd[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _override(key: str, value: Any) -> str:
    return f"{key}={_value_text(value)}"


def _corners(space: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Values that cover each key's range: every categorical value, both bounds."""
    for key, spec in space.items():
        values = spec if isinstance(spec, list) else next(iter(spec.values()))
        for value in values:
            if isinstance(spec, dict) and "int" in spec:
                value = int(value)
            yield {key: value}


def _suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            # Optuna's categorical choices must be plain scalars: lists/dicts go as JSON text
            choices = [
                c if isinstance(c, int | float | str | bool) else json.dumps(c) for c in spec
            ]
            value = trial.suggest_categorical(key, choices)
            params[key] = spec[choices.index(value)]
        else:
            ((kind, (low, high)),) = spec.items()
            if kind == "int":
                params[key] = trial.suggest_int(key, int(low), int(high))
            else:
                params[key] = trial.suggest_float(key, low, high, log=kind == "log")
    return params


def _epoch_value(metric: str, row: dict[str, Any]) -> float | None:
    """What a trial reports after each epoch: the metric's per-epoch counterpart."""
    key = "val_top1" if metric in ("best_val_top1", "final_val_top1") else metric
    value = row.get(key)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def tune(
    config: str | Path,
    overrides: list[str],
    trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run trials until the study holds ``trials`` (this process and any other on the same
    storage); write the results table, plots and the best config; return the results."""
    optuna = _require_optuna()
    base = load_config(config, overrides)
    if base.tune is None:
        raise ConfigError("tune", "tlkd tune needs a tune: block with a space (see README)")
    t = base.tune
    budget = trials or t.trials
    if budget is None:
        raise ConfigError("--trials", "give the number of trials (--trials N or tune.trials)")
    root = (base.output_dir / f"{base.experiment}-tune").resolve()
    name = study_name or base.experiment
    fixed = [f"output_dir={root}", "sweep=null", "tune=null"]
    if base.train.keep_checkpoint is None:  # trials keep their weights, not training states
        fixed.append("train.keep_checkpoint=false")
    if base.tracking.mlflow is not False and base.tracking.experiment is None:
        fixed.append(f"tracking.experiment={base.experiment}")
    reporter = reporter or Reporter(base.train.log_every)
    _check(config, overrides, fixed, t.space, t.metric)
    root.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{root / TUNE_DB}"
    sampler = (
        optuna.samplers.RandomSampler(seed=base.seed)
        if t.sampler == "random"
        else optuna.samplers.TPESampler(seed=base.seed)
    )
    pruner = optuna.pruners.MedianPruner() if t.pruner == "median" else optuna.pruners.NopPruner()
    study = None
    for attempt in range(2):  # workers starting at once on a new storage race to create it
        try:
            study = optuna.create_study(
                storage=url,
                study_name=name,
                direction=t.direction,
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
            break
        except Exception as err:  # noqa: BLE001 - storage errors come from SQLAlchemy, drivers
            if attempt:
                raise TlkdError(
                    f"--storage: cannot open the Optuna study at {url}: {first_line(err)}"
                ) from None
            time.sleep(1.0)
    assert study is not None
    reporter.print(
        f"tune        study {name!r} at {url}: {budget} trials, {t.direction} {t.metric}"
    )
    failed = ran = 0
    TrialState = optuna.trial.TrialState
    while len(study.get_trials(deepcopy=False)) < budget:
        trial = study.ask()
        if trial.number >= budget:  # another worker took the last ones meanwhile
            trial.set_user_attr("tlkd", OVER_BUDGET)
            study.tell(trial, state=TrialState.FAIL)
            break
        tag = f"[trial {trial.number + 1}/{budget}]"
        where: dict[str, Path] = {}  # the trial's run directory, once it exists
        try:
            try:
                params = _suggest(trial, t.space)
            except ValueError as err:  # Optuna: the space differs from the stored study's
                raise ConfigError(
                    "tune.space", f"does not fit study {name!r} ({err}); name another --study"
                ) from None
            run_name = f"trial-{trial.number:04d}"
            shown = ", ".join(_override(k, v) for k, v in params.items())
            reporter.print(f"{tag} {run_name}: {shown}")
            ran += 1
            value = _run_trial(
                config,
                [*overrides, *fixed, f"experiment={run_name}"],
                params,
                trial,
                t,
                where,
            )
        except Pruned as err:
            _pruned(where.get("run"))
            reporter.print(f"{tag} pruned: {err}")
            _close(study, trial, where, state=TrialState.PRUNED)
            continue
        except BaseException as err:
            _close(study, trial, where, state=TrialState.FAIL)
            if isinstance(err, ConfigError) or is_stop(err) or not isinstance(err, TlkdError):
                raise  # a space that cannot run, Ctrl-C/SIGTERM, a bug: the search stops
            failed += 1
            reporter.print(f"{tag} failed: {err}")
            continue
        _close(study, trial, where, values=value)
    result = _write_results(study, root, config, t.metric, reporter)
    result["ran_here"] = ran
    if failed:
        raise TlkdError(f"{failed} of {ran} trials failed here; see {root / 'tune.csv'}")
    return result


def _check(
    config: str | Path,
    overrides: list[str],
    fixed: list[str],
    space: dict[str, Any],
    metric: str,
) -> None:
    """Before any trial: the metric is one a run reports, every key of the space with each
    of its values or bounds makes a valid config, and a quiet dry run of the first trial's
    config passes."""
    if metric not in METRICS:
        from tlkd.config.suggest import did_you_mean

        raise ConfigError(
            "tune.metric",
            f"{metric!r} is not a number runs report{did_you_mean(metric, list(METRICS))}; "
            f"one of {', '.join(METRICS)}",
        )
    first: dict[str, Any] = {}
    for corner in _corners(space):
        ((key, value),) = corner.items()
        first.setdefault(key, value)
        try:
            load_config(config, [*overrides, *fixed, _override(key, value)])
        except ConfigError as err:
            raise ConfigError(None, f"tune.space {key}={_value_text(value)}: {err}") from None
    cfg = load_config(
        config,
        [*overrides, *fixed, "experiment=check", *(_override(k, v) for k, v in first.items())],
    )
    recipe(mode_of(cfg))(cfg.model_copy(deep=True), dry_run=True, reporter=Reporter(quiet=True))


def _run_trial(
    config: str | Path,
    overrides: list[str],
    params: dict[str, Any],
    trial: Any,
    t: Any,
    where: dict[str, Path],
) -> float:
    """Run one trial; ``where["run"]`` is set to its run directory once it exists."""
    metric = t.metric
    cfg: Config = load_config(config, [*overrides, *(_override(k, v) for k, v in params.items())])

    def report(run: Path, row: dict[str, Any]) -> None:
        where["run"] = run
        value = _epoch_value(metric, row)
        if value is None:
            return
        trial.report(value, int(row["epoch"]))
        if trial.should_prune():
            worse = "below" if t.direction == "maximize" else "above"
            raise Pruned(
                f"epoch {row['epoch']}: {value:.4g} is {worse} the median of earlier trials"
            )

    token = EPOCH_HOOKS.set((*EPOCH_HOOKS.get(), report))
    try:
        summary = recipe(mode_of(cfg))(cfg, reporter=Reporter(cfg.train.log_every, quiet=True))
    finally:
        EPOCH_HOOKS.reset(token)
    if summary:
        where["run"] = Path(summary["run_dir"])
    value = (summary or {}).get(metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise TlkdError(f"the trial's summary.json has no number {metric!r}")
    return float(value)


def _close(study: Any, trial: Any, where: dict[str, Path], **tell: Any) -> None:
    """Record the trial's run directory (once it exists), then tell Optuna how it ended."""
    if "run" in where:
        trial.set_user_attr("run_dir", str(where["run"]))
    study.tell(trial, **tell)


def _pruned(run_dir: Path | None) -> None:
    """A pruned trial's run: status ``pruned``, and like a finished trial no checkpoints."""
    if run_dir is None:
        return
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((run_dir / SUMMARY).read_text())
        summary["status"] = "pruned"
        write_json(run_dir / SUMMARY, summary)
    RunDir(run_dir).finish_checkpoints(keep=False)


def _write_results(
    study: Any, root: Path, config: str | Path, metric: str, reporter: Reporter
) -> dict[str, Any]:
    """tune.csv / tune.json (one row per trial that ran), best.yaml, tune.png."""
    rows = []
    for tr in study.get_trials(deepcopy=False):
        if tr.user_attrs.get("tlkd") == OVER_BUDGET:
            continue
        rows.append(
            {
                "trial": tr.number,
                "state": tr.state.name.lower(),
                metric: tr.value,
                **tr.params,
                "run_dir": tr.user_attrs.get("run_dir"),
            }
        )
    complete = [tr for tr in study.get_trials(deepcopy=False) if tr.state.name == "COMPLETE"]
    best = study.best_trial if complete else None
    result: dict[str, Any] = {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": metric,
        "trials": rows,
        "best": None,
    }
    if best is not None:
        best_dir = Path(best.user_attrs["run_dir"])
        result["best"] = {
            "trial": best.number,
            metric: best.value,
            "params": best.params,
            "run_dir": str(best_dir),
        }
        saved = best_dir / CONFIG
        if saved.is_file():  # the best trial's config, as a config to run again
            data = safe_yaml.safe_load(saved.read_text())
            data.pop("resolved", None)
            write_text(root / "best.yaml", yaml.safe_dump(data, sort_keys=False))
            result["best"]["config"] = str(root / "best.yaml")
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text(root / "tune.csv", buf.getvalue())
    write_json(root / "tune.json", result)
    if complete:
        _plot(study, root / "tune.png")
    _print(result, reporter, root)
    return result


def _plot(study: Any, path: Path) -> None:
    """Optuna's optimisation history (value per trial, best so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        ax = plot_optimization_history(study)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=100)
    plt.close(ax.figure)


def _print(result: dict[str, Any], reporter: Reporter, root: Path) -> None:
    if reporter.quiet:
        return
    from rich.table import Table

    rows = result["trials"]
    if rows:
        table = Table(title=f"study {result['study']}: {result['direction']} {result['metric']}")
        for col in rows[0]:
            if col != "run_dir":
                table.add_column(str(col))
        for row in rows:
            table.add_row(
                *(
                    "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                    for k, v in row.items()
                    if k != "run_dir"
                )
            )
        reporter.console.print(table)
    best = result["best"]
    if best is not None:
        reporter.print(
            f"best: trial {best['trial']}, {result['metric']} {best[result['metric']]:.4g}"
        )
        if "config" in best:
            reporter.print(f"best config: {best['config']}")
    reporter.print(f"tune dir: {root}")
