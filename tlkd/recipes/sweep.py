"""sweep: every combination of a grid of overrides, each its own run directory, resumable.

The sweep lives in ``<output_dir>/<experiment>-sweep/``: one run directory per combination
(named after its overrides), ``sweep.csv`` and ``sweep.json`` with one row per run. Running
the same sweep again skips finished runs and resumes interrupted ones, so a sweep cut short
by a crash completes by running it again.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tlkd.config import safe_yaml
from tlkd.config.loader import load_config
from tlkd.config.schema import Config
from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError, TlkdError, is_stop
from tlkd.recipes.compare import over_seeds
from tlkd.recipes.modes import mode_of, recipe
from tlkd.run.rundir import SUMMARY, write_json, write_text


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``key=v1,v2`` items (values read as YAML; commas inside [] or {} do not split)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError("--grid", f"{item!r} is not of the form key=value1,value2,...")
        parts, depth, current = [], 0, ""
        for ch in values:
            depth += ch in "[{"
            depth -= ch in "]}"
            if ch == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += ch
        parts.append(current)
        try:
            grid[key] = [safe_yaml.safe_load(p) for p in parts]
        except yaml.YAMLError:
            raise ConfigError("--grid", f"cannot read the values of {key}: {values!r}") from None
    return grid


def _run_name(combo: dict[str, Any]) -> str:
    """A readable, file-safe name from the overrides, e.g. ``temperature-4_seed-1``."""
    lasts = [k.split(".")[-1] for k in combo]
    parts = []
    for key, value in combo.items():
        short = key.split(".")[-1] if lasts.count(key.split(".")[-1]) == 1 else key
        text = json.dumps(value) if not isinstance(value, str) else value
        parts.append(re.sub(r"[^A-Za-z0-9.+-]+", "", f"{short}-{text}"))
    return "_".join(parts)


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def sweep(
    config: str | Path,
    grid_items: list[str],
    overrides: list[str],
    reporter: Reporter | None = None,
) -> list[dict[str, Any]]:
    """Run (or complete) the sweep and return its rows. Every combination is checked first
    (its config, then a quiet dry run of each one still to run): a bad one stops the sweep
    before anything runs or any folder is written."""
    base = load_config(config, overrides)
    grid = {**(base.sweep.grid if base.sweep else {}), **parse_grid(grid_items)}
    if not grid:
        raise ConfigError("--grid", "nothing to sweep: give --grid key=v1,v2 or a sweep: block")
    root = base.output_dir / f"{base.experiment}-sweep"
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    # validate every combination before running any (a typo fails the sweep at once)
    plans: list[tuple[str, dict[str, Any], Config]] = []
    for combo in combos:
        name = _run_name(combo)
        extra = [_override(k, v) for k, v in combo.items()]
        extra += [f"output_dir={root}", f"experiment={name}", "sweep=null"]
        if base.train.keep_checkpoint is None:  # a sweep's finished runs keep no checkpoint
            extra.append("train.keep_checkpoint=false")
        if base.tracking.mlflow is not False and base.tracking.experiment is None:
            # one MLflow experiment for the whole sweep
            extra.append(f"tracking.experiment={base.experiment}")
        with _naming(name, combo):
            plans.append((name, combo, load_config(config, [*overrides, *extra])))
    if len({name for name, _, _ in plans}) != len(plans):
        raise ConfigError("--grid", "two combinations give the same run name; vary the values")
    reporter = reporter or Reporter(base.train.log_every)
    todo = [(name, combo, cfg) for name, combo, cfg in plans if _status(root / name) != "finished"]
    if todo:
        reporter.print(f"checking {len(todo)} of {len(plans)} sweep runs (dry runs) first")
    for name, combo, cfg in todo:
        with _naming(name, combo):  # the checks a dry run makes, on a copy, silently
            recipe(mode_of(cfg))(
                cfg.model_copy(deep=True), dry_run=True, reporter=Reporter(quiet=True)
            )
    root.mkdir(parents=True, exist_ok=True)
    write_text(
        root / "sweep.yaml",
        yaml.safe_dump(
            {"config": str(Path(config).resolve()), "overrides": overrides, "grid": grid},
            sort_keys=False,
        ),
    )
    rows, failed = [], 0
    for i, (name, combo, cfg) in enumerate(plans, start=1):
        run_dir = root / name
        status = _status(run_dir)
        run_recipe = recipe(mode_of(cfg))
        reporter.print(f"[{i}/{len(plans)}] {name}: {status or 'new'}")
        if status != "finished":
            try:
                resume = run_dir if (run_dir / "checkpoint.pt").exists() else None
                if run_dir.exists() and resume is None:  # died before its first checkpoint
                    _set_aside(run_dir)
                run_recipe(cfg, reporter=reporter, resume=resume)
            except TlkdError as err:
                if is_stop(err):  # Ctrl-C / SIGTERM stop the sweep, with their exit code
                    raise
                failed += 1
                reporter.print(f"[{i}/{len(plans)}] {name} failed: {err}")
        rows.append(_row(run_dir, name, combo))
        _write_tables(root, rows, grid)
    _print(rows, grid, reporter)
    reporter.print(f"sweep dir: {root}")
    if failed:
        raise TlkdError(f"{failed} of {len(plans)} sweep runs failed; run the sweep again to retry")
    return rows


@contextlib.contextmanager
def _naming(name: str, combo: dict[str, Any]) -> Iterator[None]:
    """A failure while checking one combination names it: ``sweep run NAME (k=v, ...): ...``."""
    try:
        yield
    except TlkdError as err:
        shown = ", ".join(_override(k, v) for k, v in combo.items())
        message = f"sweep run {name} ({shown}): {err}"
        if isinstance(err, ConfigError):  # exit 2: the combination cannot run as written
            raise ConfigError(None, message) from None
        wrapped = TlkdError(message)
        wrapped.exit_code = err.exit_code
        raise wrapped from None


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / SUMMARY).read_text()).get("status")
    except (OSError, ValueError):
        return "started" if run_dir.exists() else None


def _set_aside(run_dir: Path) -> None:
    """A run directory without a checkpoint holds nothing to resume; keep it, renamed."""
    n = 1
    while run_dir.with_name(f"{run_dir.name}.incomplete-{n}").exists():
        n += 1
    run_dir.rename(run_dir.with_name(f"{run_dir.name}.incomplete-{n}"))


def _row(run_dir: Path, name: str, combo: dict[str, Any]) -> dict[str, Any]:
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        summary = {}
    return {
        "run": name,
        **combo,
        "status": summary.get("status", "failed"),
        "best_val_top1": summary.get("best_val_top1"),
        "final_val_top1": summary.get("final_val_top1"),
        "wall_time_s": summary.get("wall_time_s"),
    }


def _groups(rows: list[dict[str, Any]], grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds for each combination of the other grid keys."""
    keys = [k for k in grid if k != "seed"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row[k] for k in keys]), []).append(row)
    out = []
    for members in groups.values():
        out.append(
            {
                **{k: members[0][k] for k in keys},
                "runs": len(members),
                "final_val_top1": over_seeds(members, "final_val_top1"),
                "best_val_top1": over_seeds(members, "best_val_top1"),
            }
        )
    return out


def _write_tables(root: Path, rows: list[dict[str, Any]], grid: dict[str, list[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(root / "sweep.csv", buf.getvalue())
    write_json(root / "sweep.json", {"runs": rows, "groups": _groups(rows, grid)})


def _print(rows: list[dict[str, Any]], grid: dict[str, list[Any]], reporter: Reporter) -> None:
    from rich.table import Table

    if reporter.quiet:
        return
    table = Table(title="sweep")
    for col in rows[0]:
        table.add_column(str(col))
    for row in rows:
        table.add_row(
            *(
                "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
                for v in row.values()
            )
        )
    reporter.console.print(table)
    groups = _groups(rows, grid)
    if "seed" in grid:
        summary = Table(title="over seeds (mean ± std)")
        for col in groups[0]:
            summary.add_column(str(col))
        for g in groups:
            summary.add_row(*(str(v) for v in g.values()))
        reporter.console.print(summary)
