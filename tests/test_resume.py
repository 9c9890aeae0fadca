"""--resume: a killed run continues to exactly the result of an uninterrupted one."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import error_line, small_config, tlkd_env, write_images
from safetensors.torch import load_file
from typer.testing import CliRunner

from tlkd.cli import app

LEARNED = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr")


def _resumable_config(root: Path) -> dict:
    """A config whose epochs take long enough to be killed in the middle (12 steps), with
    random augmentation and a loader worker, so every RNG stream matters. The images depend
    only on their seeds, so runs under different roots learn exactly the same."""
    train = write_images(root / "train", per_class=16, size=32, seed=1)
    val = write_images(root / "val", per_class=4, size=32, seed=2)
    return small_config(
        root,
        train,
        val,
        data={
            "image_size": 32,
            "num_workers": 1,
            "augment": {"crop_mode": "rrc", "scale": [0.5, 1.0], "hflip": 0.5},
        },
        train={
            "epochs": 3,
            "batch_size": 4,
            "log_every": 1,
            "scheduler": {"name": "cosine", "warmup_epochs": 1},
        },
    )


@pytest.fixture
def resumable(tmp_path, write_config):
    cfg = _resumable_config(tmp_path)
    return lambda name, **kw: write_config({**cfg, "experiment": name, **kw}, f"{name}.yaml")


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """The uninterrupted run of ``resumable``'s config, shared by the tests that compare an
    interrupted and resumed run with it (one per test process)."""
    root = tmp_path_factory.mktemp("full")
    config = root / "full.yaml"
    config.write_text(yaml.safe_dump({**_resumable_config(root), "experiment": "full"}))
    _run_here("finetune", config)
    return root / "runs" / "full"


def _run_here(*args) -> None:
    """An uninterrupted run in this process: the same code, seeds and single thread as the
    killed runs' processes (a reference needs no process of its own)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _tlkd(tmp_path, *args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "tlkd", *map(str, args)],
        cwd=tmp_path,
        env=tlkd_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def _kill_during(tmp_path, config, epoch, mode="finetune"):
    """Start a run and SIGKILL it a few steps into ``epoch``."""
    proc = _tlkd(tmp_path, mode, config)
    seen = []
    for line in proc.stdout:  # plain progress lines (stdout is a pipe)
        seen.append(line)
        if line.startswith(f"epoch {epoch}/3 step 5/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)


def _learned(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in LEARNED} for r in rows]


def _same_weights(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, resumable, full):
    killed = tmp_path / "runs" / "killed"
    _kill_during(tmp_path, resumable("killed"), epoch=2)
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 2 cut off
    resumed = _finish(_tlkd(tmp_path, "finetune", "--resume", killed))
    assert "resuming from checkpoint.pt" in resumed
    assert _learned(killed) == _learned(full)
    assert _same_weights(killed, full)
    ckpt = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3


def test_adapt_killed_mid_epoch_resumes_exactly(tmp_path, resumable):
    """DANN: paired source/target batches, the domain discriminator and its lambda schedule
    all continue where they stopped."""
    target = write_images(tmp_path / "target", per_class=10, size=48, seed=3, noise=60)
    adapt = {"method": "dann", "warmup_epochs": 1, "hidden": 16}
    data = yaml.safe_load(resumable("x").read_text())["data"]
    data["unlabeled"] = str(target)
    _run_here("adapt", resumable("full", adapt=adapt, data=data))
    killed = tmp_path / "runs" / "killed"
    _kill_during(tmp_path, resumable("killed", adapt=adapt, data=data), epoch=3, mode="adapt")
    _finish(_tlkd(tmp_path, "adapt", "--resume", killed))
    full = _learned(tmp_path / "runs" / "full")
    assert len(full) == 3 and _learned(killed) == full
    rows = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss_domain"] > 0
    assert _same_weights(killed, tmp_path / "runs" / "full")


def test_resume_after_death_while_writing_a_checkpoint(tmp_path, resumable, full):
    """The atomic protocol leaves either checkpoint.pt or checkpoint.prev.pt valid; a torn or
    missing newest checkpoint falls back to the previous one and still ends identically."""
    _kill_during(tmp_path, resumable("torn"), epoch=3)
    torn = tmp_path / "runs" / "torn"
    data = (torn / "checkpoint.pt").read_bytes()  # epoch 2's, torn as by a crash mid-write
    (torn / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    out = _finish(_tlkd(tmp_path, "finetune", "--resume", torn))
    assert "checkpoint.pt is unreadable" in out and "resuming from checkpoint.prev.pt" in out
    assert _learned(torn) == _learned(full)
    assert _same_weights(torn, full)


def test_resume_refuses_a_changed_config_and_missing_checkpoints(tmp_path, resumable, cli):
    """In process: exit codes and the one error line are what the CLI returns and prints
    (tests/test_cli.py checks the same path in a real process)."""
    train = {**_resumable_config(tmp_path)["train"], "epochs": 1}
    train["optimizer"] = {k: v for k, v in train["optimizer"].items() if k != "name"}
    config = resumable("base", train=train)  # the optimizer's name left to tlkd
    assert cli("finetune", config).exit_code == 0
    run = tmp_path / "runs" / "base"
    result = cli("finetune", "--resume", run, "train.optimizer.lr=0.5")
    assert result.exit_code == 2
    assert "error: --resume: the config differs from the run's in: train.optimizer.lr" in (
        result.output
    )
    # a run saved before a default was resolved at start holds the value itself: the same
    saved = yaml.safe_load((run / "config.yaml").read_text())
    name = saved["resolved"].pop("train.optimizer.name")
    saved["train"]["optimizer"]["name"] = name
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    result = cli("finetune", "--resume", run, "train.epochs=2")
    assert result.exit_code == 0, result.output
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).unlink(missing_ok=True)
    result = cli("finetune", "--resume", run, "train.epochs=2")
    assert result.exit_code == 1 and "no usable checkpoint" in result.output


def _signal_during(tmp_path, config, sig, epoch=2, times=1):
    proc = _tlkd(tmp_path, "finetune", config)
    for line in proc.stdout:
        if line.startswith(f"epoch {epoch}/3 step 5/"):
            for i in range(times):
                if i:  # once the first signal's handler has run (it says so on stderr)
                    for said in iter(proc.stderr.readline, ""):
                        if said.startswith(f"{sig.name}: stopping"):
                            break
                proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signal_checkpoints_the_step_and_resume_is_exact(tmp_path, resumable, full, sig, code):
    stopped = tmp_path / "runs" / "stopped"
    returncode, err = _signal_during(tmp_path, resumable("stopped"), sig)
    assert returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {sig.name} at epoch 2, step ") and "--resume" in last
    ckpt = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["partial"]["epoch"] == 2 and ckpt["partial"]["step"] >= 5
    _finish(_tlkd(tmp_path, "finetune", "--resume", stopped))
    assert _learned(stopped) == _learned(full)
    assert _same_weights(stopped, full)


def test_second_ctrl_c_exits_at_once(tmp_path, resumable):
    # accumulating over the whole epoch: the first Ctrl-C waits for the epoch's end; batch 2
    # (24 steps an epoch) leaves 19 steps for the second Ctrl-C to land in on a fast machine
    train = yaml.safe_load(resumable("x").read_text())["train"]
    config = resumable("twice", train={**train, "accum_steps": 1000, "batch_size": 2})
    returncode, err = _signal_during(tmp_path, config, signal.SIGINT, times=2)
    assert returncode == 130, err
    # quit at once (KeyboardInterrupt: "interrupted"), not the first Ctrl-C's orderly stop at
    # the epoch's end ("error: stopped by SIGINT after epoch 2"), which also exits 130 and is
    # what an ignored second Ctrl-C would give
    assert "interrupted" in err.splitlines(), err
    assert "stopped by SIGINT" not in err, err


def test_nonfinite_loss_stops_with_epoch_and_step(tmp_path, tiny_config, run_cli):
    blowup = {"optimizer": {"name": "sgd", "lr": 1.0e12, "weight_decay": 0.0}}
    proc = run_cli("finetune", tiny_config(train=blowup))
    assert proc.returncode == 1
    assert re.match(r"error: loss became (nan|inf) at epoch 1, step \d+", error_line(proc))
    proc = run_cli("finetune", tiny_config("skip.yaml", train={**blowup, "skip_nonfinite": 2}))
    assert proc.returncode == 1 and "after skipping 2 such steps" in error_line(proc)


def _worker_path(config):
    """The same config on loader workers, with random erasing (which runs per batch in the
    training process)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["in_memory"] = False
    cfg["data"]["augment"]["re_prob"] = 0.5
    config.write_text(yaml.safe_dump(cfg))
    return config


def test_worker_path_with_random_erasing_resumes_exactly(tmp_path, resumable):
    _run_here("finetune", _worker_path(resumable("full")))
    full = tmp_path / "runs" / "full"
    assert json.loads((full / "summary.json").read_text())["data_path"].startswith("1 loader")
    stopped = tmp_path / "runs" / "stopped"
    returncode, err = _signal_during(tmp_path, _worker_path(resumable("stopped")), signal.SIGTERM)
    assert returncode == 143, err
    _finish(_tlkd(tmp_path, "finetune", "--resume", stopped))
    assert _learned(stopped) == _learned(full)
    assert _same_weights(stopped, full)
