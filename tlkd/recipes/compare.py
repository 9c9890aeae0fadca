"""compare: one table of several runs, and mean ± std over runs that differ only in seed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from tlkd.config import safe_yaml
from tlkd.errors import ConfigError
from tlkd.run.rundir import CONFIG, SUMMARY

# keys that do not make two runs different experiments
_IGNORED = {"seed", "experiment", "output_dir"}


def _load(run: Path) -> dict[str, Any]:
    if not (run / SUMMARY).is_file() or not (run / CONFIG).is_file():
        raise ConfigError(None, f"{run} is not a tlkd run directory (no {SUMMARY} or {CONFIG})")
    summary = json.loads((run / SUMMARY).read_text())
    config = safe_yaml.safe_load((run / CONFIG).read_text())
    # the mode too: a tlkd wise run keeps the config of the run it interpolates
    group = {k: v for k, v in config.items() if k not in _IGNORED}
    key = json.dumps({**group, "mode": summary.get("mode")}, sort_keys=True)
    return {"run": run, "summary": summary, "seed": config.get("seed"), "group": key}


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def over_seeds(members: list[dict[str, Any]], metric: str) -> str:
    """Mean ± std of ``metric`` over distinct seeds (compare's groups, sweep's grid cells).
    Runs repeating a seed are averaged into that seed first: a repeat is not another seed, and
    one seed has no seed std. A member without a ``seed`` counts as seed None."""
    per_seed: dict[str, list[float]] = {}
    for m in members:
        if m[metric] is not None:
            per_seed.setdefault(json.dumps(m.get("seed")), []).append(m[metric])
    return mean_std([statistics.mean(values) for values in per_seed.values()])


def seeds_label(group: dict[str, Any]) -> str:
    """``"2"`` seeds, or ``"2 runs, 1 seed"`` when runs repeat a seed."""
    seeds = group["seeds"]
    if group["n_runs"] == seeds:
        return str(seeds)
    return f"{group['n_runs']} runs, {seeds} seed{'s' if seeds != 1 else ''}"


def compare(run_dirs: list[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """Per-run rows and per-group rows (groups: identical configs but for the seed; ``seeds``
    counts distinct seeds, ``n_runs`` the runs, which differ when a seed is repeated)."""
    runs = [_load(Path(r).expanduser().resolve()) for r in run_dirs]
    rows = [
        {
            "run": r["run"].name,
            "seed": r["seed"],
            "mode": r["summary"].get("mode"),
            "model": r["summary"].get("model"),
            "status": r["summary"].get("status"),
            "best_val_top1": r["summary"].get("best_val_top1"),
            "final_val_top1": r["summary"].get("final_val_top1"),
            "params": r["summary"].get("params"),
            "wall_time_s": r["summary"].get("wall_time_s"),
        }
        for r in runs
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r, row in zip(runs, rows, strict=True):
        groups.setdefault(r["group"], []).append(row)
    group_rows = []
    for members in groups.values():
        seeds = {json.dumps(m["seed"]) for m in members}
        group_rows.append(
            {
                "runs": ", ".join(m["run"] for m in members),
                "n_runs": len(members),
                "seeds": len(seeds),
                "model": members[0]["model"],
                "final_val_top1": over_seeds(members, "final_val_top1"),
                "best_val_top1": over_seeds(members, "best_val_top1"),
            }
        )
    return {"runs": rows, "groups": group_rows}


def print_tables(result: dict[str, list[dict[str, Any]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:  # logs and files: do not squeeze the tables into 80 columns
        console = Console(highlight=False, width=200)
    table = Table(title="runs")
    for col in (
        "run",
        "seed",
        "mode",
        "model",
        "status",
        "best top-1",
        "final top-1",
        "params",
        "time (s)",
    ):
        table.add_column(col, justify="right" if col not in ("run", "mode", "model") else "left")
    for r in result["runs"]:
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        table.add_row(
            r["run"],
            str(r["seed"]),
            str(r["mode"]),
            str(r["model"]),
            str(r["status"]),
            fmt(r["best_val_top1"]),
            fmt(r["final_val_top1"]),
            f"{r['params']:,}" if r["params"] else "-",
            fmt(r["wall_time_s"]),
        )
    console.print(table)
    groups = Table(title="same config, over seeds (mean ± std)")
    for col in ("runs", "seeds", "model", "final top-1", "best top-1"):
        groups.add_column(col)
    for g in result["groups"]:
        groups.add_row(
            g["runs"], seeds_label(g), str(g["model"]), g["final_val_top1"], g["best_val_top1"]
        )
    console.print(groups)
