"""The `tlkd` command line. Errors print one line on stderr: exit 2 for a config that cannot
run, 1 for a failure while running, 130 when interrupted."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Transfer learning and knowledge distillation for timm image models, from YAML files.",
)

OVERRIDES = typer.Argument(
    None, help="Overrides as key.path=value, e.g. train.epochs=3 model.name=resnet18"
)
DRY_RUN = typer.Option(
    False, "--dry-run", help="Validate, build model and data, print the plan; train nothing."
)
QUIET = typer.Option(False, "--quiet", "-q", help="Print only errors and the final line.")
CONFIG_ARG = typer.Argument(None, help="Experiment YAML file (default with --resume: the run's).")
RESUME = typer.Option(
    None, "--resume", help="Continue this run directory from its last checkpoint."
)


def _guard(fn: Callable[[], Any]) -> Any:
    import contextvars

    from tlkd.errors import TlkdError

    try:  # in a copy of the context: values a command sets (the command line) end with it
        return contextvars.copy_context().run(fn)
    except TlkdError as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None


def _train_command(
    mode: str,
    config: str | None,
    overrides: list[str] | None,
    dry_run: bool,
    quiet: bool,
    resume: str | None,
) -> None:
    def run() -> None:
        from pathlib import Path

        from tlkd.run import startup

        clock = startup.begin()  # the run's start-up cost, by phase (summary.json startup_s)
        from tlkd.config import load_config
        from tlkd.errors import ConfigError

        overrides_ = list(overrides or [])
        run_dir = Path(resume).expanduser().resolve() if resume else None
        if config is not None and "=" in config and not Path(config).exists():
            overrides_.insert(0, config)  # `--resume RUN key=value`: no config file given
            config_ = None
        else:
            config_ = config
        if config_ is None:
            if run_dir is None:
                raise ConfigError(None, "give an experiment file (or --resume RUN_DIR)")
            config_ = str(run_dir / "config.yaml")
            if not Path(config_).is_file():
                raise ConfigError("--resume", f"{run_dir} is not a tlkd run directory")
        with clock.phase("config"):  # a config error exits here, before torch loads
            cfg = load_config(config_, overrides_)
        from tlkd.run.card import COMMAND, command_line

        again = ["--resume", resume] if resume else []
        COMMAND.set(command_line(mode, config, *(overrides or []), *again))
        with clock.phase("imports"):  # torch, timm and the recipe
            from tlkd.engine import distributed
            from tlkd.engine.progress import Reporter
            from tlkd.recipes.modes import recipe as recipe_of

            recipe = recipe_of(mode)
        ddp = distributed.init_from_env(cfg.train.device)  # torchrun: join the process group
        try:
            reporter = Reporter(cfg.train.log_every, quiet=quiet or not ddp.is_main)
            summary = recipe(cfg, dry_run=dry_run, reporter=reporter, resume=run_dir)
        finally:
            distributed.shutdown()
        if quiet and summary:
            print(f"{summary['run_dir']}  best val top-1 {summary['best_val_top1']:.2f}%")

    _guard(run)


def _register(mode: str, help_text: str) -> None:
    """One Typer command per training mode: the same arguments, one shared runner."""

    def command(
        config: str = CONFIG_ARG,
        overrides: list[str] = OVERRIDES,
        dry_run: bool = DRY_RUN,
        quiet: bool = QUIET,
        resume: str = RESUME,
    ) -> None:
        _train_command(mode, config, overrides, dry_run, quiet, resume)

    command.__doc__ = help_text
    app.command(name=mode)(command)


def _register_modes() -> None:
    from tlkd.recipes.modes import MODES

    for mode, help_text in MODES.items():
        _register(mode, help_text)


_register_modes()


@app.command()
def evaluate(
    target: str = typer.Argument(..., help="A run directory, or an experiment YAML file."),
    overrides: list[str] = OVERRIDES,
    no_speed: bool = typer.Option(False, "--no-speed", help="Skip latency/throughput timing."),
    quiet: bool = QUIET,
) -> None:
    """Evaluate a run's best weights (or a config's model) on its val data or data.val=PATH."""

    def run() -> None:
        from tlkd.engine.progress import Reporter
        from tlkd.recipes.evaluate import evaluate as run_evaluate

        results = run_evaluate(target, overrides or [], Reporter(quiet=quiet), speed=not no_speed)
        if quiet:
            print(f"{results['run_dir']}  top-1 {results['top1']:.2f}%")

    _guard(run)


@app.command()
def export(
    run_dir: str = typer.Argument(..., help="A tlkd run directory."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript"),
    output: str = typer.Option(None, "--output", "-o", help="Default: the run directory."),
    quantize: str = typer.Option(
        None, "--quantize", help="int8: also an int8 ONNX model, calibrated on training images."
    ),
    calibration: int = typer.Option(256, "--calibration", help="int8: calibration images."),
    max_drop: float = typer.Option(
        1.0, "--max-drop", help="int8: refuse if val top-1 drops more than this many points."
    ),
) -> None:
    """Export a run's best model (ONNX or TorchScript), verified against PyTorch's outputs."""

    def run() -> None:
        from tlkd.recipes.export import export as run_export

        report = run_export(run_dir, fmt, output, 1e-4, quantize, calibration, max_drop)
        check = (
            f"outputs match PyTorch's (max abs diff {report['max_abs_diff']:.2e})"
            if report["verified"]
            else "not verified (pip install onnxruntime to check)"
        )
        print(f"wrote {report['file']}: {check}")
        if "int8" in report:
            q = report["int8"]
            print(
                f"wrote {q['file']}: val top-1 {q['int8_top1']:.2f}% (fp32 {q['fp32_top1']:.2f}%), "
                f"{q['int8_latency_ms']:.2f} ms/image at batch 1 (fp32 "
                f"{q['fp32_latency_ms']:.2f}), {q['int8_mb']:.1f} MiB (fp32 {q['fp32_mb']:.1f})"
            )

    _guard(run)


@app.command()
def predict(
    target: str = typer.Argument(..., help="A run directory, or a .onnx file from tlkd export."),
    inputs: list[str] = typer.Argument(..., help="Image files, folders (recursive) or globs."),
    out: str = typer.Option(None, "--out", "-o", help="Write every row to FILE.csv or .jsonl."),
    topk: int = typer.Option(5, "--topk", "-k", help="Classes kept per image, best first."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per forward pass."),
    quiet: bool = QUIET,
) -> None:
    """Classify images with a run's best model (or its ONNX export), as evaluate preprocesses."""

    def run() -> None:
        from tlkd.engine.progress import Reporter
        from tlkd.recipes.predict import predict as run_predict

        result = run_predict(target, inputs, out, topk, batch_size, reporter=Reporter(quiet=quiet))
        if quiet:
            print(
                f"{result['predicted']} of {result['images']} images predicted"
                + (f", written to {result['out']}" if "out" in result else "")
            )

    _guard(run)


@app.command()
def sweep(
    config: str = typer.Argument(..., help="Experiment YAML file (may hold a sweep: block)."),
    overrides: list[str] = OVERRIDES,
    grid: list[str] = typer.Option(
        None, "--grid", help="key=v1,v2,...: values to sweep (repeat for more keys)."
    ),
    quiet: bool = QUIET,
) -> None:
    """Run every combination of a grid as its own run; rerun to complete an interrupted sweep."""

    def run() -> None:
        from tlkd.engine.progress import Reporter
        from tlkd.recipes.sweep import sweep as run_sweep
        from tlkd.run.card import COMMAND, command_line

        grids = [a for g in grid or [] for a in ("--grid", g)]
        COMMAND.set(command_line("sweep", config, *(overrides or []), *grids))

        run_sweep(config, grid or [], overrides or [], Reporter(quiet=quiet))

    _guard(run)


@app.command()
def tune(
    config: str = typer.Argument(..., help="Experiment YAML file with a tune: block."),
    overrides: list[str] = OVERRIDES,
    trials: int = typer.Option(None, "--trials", "-n", help="Trials in the study (all workers)."),
    storage: str = typer.Option(
        None, "--storage", help="Optuna storage URL (default: SQLite in the tune folder)."
    ),
    study: str = typer.Option(None, "--study", help="Study name (default: the experiment)."),
    quiet: bool = QUIET,
) -> None:
    """Search hyperparameters with Optuna: each trial a run directory; prints the best."""

    def run() -> None:
        from tlkd.engine.progress import Reporter
        from tlkd.recipes.tune import tune as run_tune
        from tlkd.run.card import COMMAND, command_line

        given = [*(["--trials", str(trials)] if trials else []), *(overrides or [])]
        COMMAND.set(command_line("tune", config, *given))
        result = run_tune(config, overrides or [], trials, storage, study, Reporter(quiet=quiet))
        if quiet and result["best"] is not None:
            best = result["best"]
            print(f"best trial {best['trial']}: {result['metric']} {best[result['metric']]:.4g}")

    _guard(run)


@app.command()
def compare(
    run_dirs: list[str] = typer.Argument(..., help="Run directories."),
    json_out: str = typer.Option(None, "--json", help="Also write the tables as JSON here."),
) -> None:
    """Compare runs: val top-1 per run, mean ± std over runs differing only in seed."""

    def run() -> None:
        import json
        from pathlib import Path

        from tlkd.recipes.compare import compare as run_compare
        from tlkd.recipes.compare import print_tables
        from tlkd.run.rundir import write_text

        result = run_compare(run_dirs)
        print_tables(result)
        if json_out:  # atomic, and a write error is one line
            write_text(Path(json_out), json.dumps(result, indent=2) + "\n")

    _guard(run)


@app.command()
def wise(
    run_dir: str = typer.Argument(..., help="A finished tlkd finetune run directory."),
    more: list[float] = typer.Argument(None, hidden=True, metavar="ALPHA"),  # --alpha 0 0.5 1
    alpha: list[float] = typer.Option(
        None, "--alpha", "-a", help="Mixing coefficients in [0, 1], e.g. --alpha 0 0.25 0.5 (0.5)."
    ),
    quiet: bool = QUIET,
) -> None:
    """WiSE-FT: mix a run's start and final weights, score each alpha, save the best."""

    def run() -> None:
        from tlkd.engine.progress import Reporter
        from tlkd.recipes.wise import wise as run_wise
        from tlkd.run.card import COMMAND, command_line

        shown = [str(a) for a in [*(alpha or []), *(more or [])]]
        COMMAND.set(command_line("wise", run_dir, *(["--alpha", *shown] if shown else [])))

        summary = run_wise(run_dir, [*(alpha or []), *(more or [])], Reporter(quiet=quiet))
        if quiet:
            print(
                f"{summary['run_dir']}  alpha {summary['wise']['alpha']:g}  "
                f"val top-1 {summary['best_val_top1']:.2f}%"
            )

    _guard(run)


@app.command()
def version() -> None:
    """Print the versions of tlkd and its main dependencies."""
    from tlkd.versions import versions

    for name, v in versions().items():
        print(f"{name} {v}")


def main() -> None:
    app()
