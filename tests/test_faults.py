"""Faults of the environment: unwritable folders, no HOME, a full disk, hostile YAML and weight
files that are not weights. Each gives one clear line (or, for the cache, one warning and a
run that goes on), and nothing already written is lost."""

from __future__ import annotations

import errno
import json
import time
import tracemalloc
import zipfile

import pytest
import torch
from conftest import MODEL

from tlkd.config import load_config
from tlkd.config.schema import ModelConfig, TeacherConfig
from tlkd.data import memory
from tlkd.errors import ConfigError, TlkdError
from tlkd.run import rundir


def one_error(result) -> str:
    """The single ``error: ...`` line of a failed in-process command (no traceback)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Cache warnings are given once per folder and process: start from none given."""
    monkeypatch.setattr(memory, "_warned", set())


# --- 1. output_dir that cannot hold run folders: exit 2 before anything is built -------------


def _no_building(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data were built before output_dir was checked")

    monkeypatch.setattr("tlkd.recipes.build.build_splits", refuse)


@pytest.mark.parametrize("dry_run", [False, True])
def test_output_dir_below_a_file_is_exit_2_before_building(
    tmp_path, tiny_config, cli, monkeypatch, dry_run
):
    (tmp_path / "file.txt").write_text("a file, not a folder\n")
    target = tmp_path / "file.txt" / "runs"
    _no_building(monkeypatch)
    args = ["--dry-run"] if dry_run else []
    result = cli("finetune", tiny_config(), f"output_dir={target}", *args)
    assert result.exit_code == 2, result.output
    line = one_error(result)
    assert line.startswith("error: output_dir: ") and str(target) in line


def test_read_only_output_dir_is_exit_2(tmp_path, tiny_config, cli, monkeypatch):
    # tests run as root, which writes anywhere: make the folder refuse files instead
    target = tmp_path / "readonly"
    target.mkdir()
    real = rundir.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        if dir is not None and str(dir) == str(target):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(rundir.tempfile, "mkstemp", mkstemp)
    _no_building(monkeypatch)
    result = cli("finetune", tiny_config(), f"output_dir={target}")
    assert result.exit_code == 2
    line = one_error(result)
    assert "output_dir" in line and str(target) in line and "Permission denied" in line
    # a dry run does not write: it asks the folder's permissions
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: str(path) != str(target))
    result = cli("finetune", tiny_config(), f"output_dir={target / 'sub'}", "--dry-run")
    assert result.exit_code == 2
    assert "output_dir" in one_error(result) and "read-only" in one_error(result)


def test_output_dir_check_leaves_nothing_behind(tmp_path):
    target = tmp_path / "a" / "b" / "runs"
    rundir.check_output_dir(target)
    assert not (tmp_path / "a").exists()


# --- 2. an unusable cache folder never stops a run -------------------------------------------


def _cache_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: cache folder")]


def test_cache_dir_below_a_file_runs_without_a_disk_cache(
    tmp_path, tiny_config, cli, monkeypatch, fresh_warnings
):
    (tmp_path / "file.txt").write_text("x")
    bad = tmp_path / "file.txt" / "cache"
    monkeypatch.setenv("TLKD_CACHE_DIR", str(bad))
    result = cli("finetune", tiny_config(), "train.epochs=1", "data.in_memory=true")
    assert result.exit_code == 0, result.output + result.stderr
    warnings = _cache_warnings(result.stderr)
    assert len(warnings) == 1, result.stderr
    assert str(bad) in warnings[0] and "TLKD_CACHE_DIR" in warnings[0]
    assert "in memory" in result.output  # the in-memory data path, decoded without a cache
    # the key moves it too, and is named when it is the one pointing at the bad folder
    bad2 = tmp_path / "file.txt" / "cache2"
    result = cli("finetune", tiny_config(), "train.epochs=1", f"data.cache_dir={bad2}")
    assert result.exit_code == 0, result.output + result.stderr
    warnings = _cache_warnings(result.stderr)
    assert len(warnings) == 1 and "data.cache_dir" in warnings[0] and str(bad2) in warnings[0]


def test_no_home_runs_without_a_disk_cache(tmp_path, tiny_config, cli, monkeypatch, fresh_warnings):
    home = tmp_path / "no-such-home"
    monkeypatch.delenv("TLKD_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(home))
    # precision and channels_last auto: the tuning memory is used (and must do without a file)
    result = cli(
        "finetune", tiny_config(), "train.epochs=1", "data.in_memory=true",
        "train.precision=auto", "train.channels_last=auto",
    )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    warnings = _cache_warnings(result.stderr)
    assert len(warnings) == 1, result.stderr
    assert str(home / ".cache" / "tlkd") in warnings[0]
    assert "home folder does not exist" in warnings[0] and "TLKD_CACHE_DIR" in warnings[0]
    assert not home.exists()  # nobody's home folder is created


def test_tuning_memory_without_a_folder(tmp_path):
    from tlkd.engine import tune

    assert tune.remembered(None) == {}
    tune.remember(None, "key", ("fp32", False))  # nothing to write, nothing raised
    (tmp_path / "file.txt").write_text("x")
    tune.remember(tmp_path / "file.txt" / "cache", "key", ("fp32", False))


def test_teacher_cache_without_a_folder(tmp_path):
    from test_teacher_cache import _loader, _teacher

    from tlkd.distill.cache import build_bank, cached_value

    loader, teacher, cpu, logs = _loader(), _teacher(), torch.device("cpu"), []
    bank = build_bank(loader, [teacher], [True], 2, 0, None, cpu, None, logs.append)
    assert bank.files == [] and bank.logits[0].shape == (20, 2, 10)
    assert "memory only" in logs[-1]
    (tmp_path / "file.txt").write_text("x")
    below_a_file = tmp_path / "file.txt" / "cache"  # saving fails: the bank is kept anyway
    again = build_bank(loader, [teacher], [True], 2, 0, None, cpu, below_a_file, logs.append)
    assert torch.equal(again.logits[0], bank.logits[0])
    assert cached_value(None, "k", lambda: 1.5) == (1.5, False)
    assert cached_value(below_a_file, "k", lambda: 2.5) == (2.5, False)


# --- 3. a full disk while writing run files: one line, exit 1, resume continues -------------


def test_full_disk_at_a_checkpoint_then_resume(tmp_path, tiny_config, cli, monkeypatch):
    config = tiny_config(train={"epochs": 3})
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 2's checkpoint: part written, then the disk is full
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(rundir.torch, "save", save)
    result = cli("finetune", config)
    assert result.exit_code == 1, result.output + result.stderr
    run = tmp_path / "runs" / "tiny"
    line = one_error(result)
    assert line == f"error: could not write {run / 'checkpoint.pt'}: No space left on device"
    assert not list(run.glob(".checkpoint.pt.*"))  # the temp file is gone
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1  # the last good checkpoint stays
    monkeypatch.setattr(rundir.torch, "save", real_save)  # space freed
    result = cli("finetune", "--resume", run)
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 3
    epochs = [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_any_run_file_write_error_names_the_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text('{"old": true}\n')

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(rundir.os, "fsync", fsync)
    with pytest.raises(TlkdError) as info:
        rundir.write_json(target, {"new": True})
    assert str(info.value) == f"could not write {target}: Input/output error"
    assert json.loads(target.read_text()) == {"old": True}  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# --- 4. YAML aliases: bounded expansion ------------------------------------------------------


def billion_laughs() -> str:
    """Nine levels of nine aliases (9**9 strings) under a real key: without a bound, schema
    validation (and its error message) walks all of them."""
    levels = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        levels.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "experiment: boom\ndata:\n  classes: [" + ", ".join(levels) + "]\n"


def test_billion_laughs_is_one_line_fast(tmp_path, write_config, cli):
    path = write_config(billion_laughs(), "laughs.yaml")
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    took = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert took < 1.0 and peak < 20 * 2**20
    assert "aliases expand to more than" in str(info.value) and str(path) in str(info.value)
    t0 = time.perf_counter()
    result = cli("finetune", path, "--dry-run")
    assert result.exit_code == 2 and time.perf_counter() - t0 < 1.0
    assert "invalid YAML" in one_error(result)


def test_recursive_alias_and_small_aliases(tmp_path, write_config):
    from tlkd.config import safe_yaml

    with pytest.raises(ConfigError, match="recursive"):
        load_config(write_config("a: &a [*a]\n", "loop.yaml"))
    # plain anchors and aliases of a normal size still work, as with yaml.safe_load
    data = safe_yaml.safe_load("base: &b {lr: 0.1, epochs: 3}\nother: *b\n")
    assert data == {"base": {"lr": 0.1, "epochs": 3}, "other": {"lr": 0.1, "epochs": 3}}
    text = (
        "experiment: x\nmodel: {name: test_resnet}\n"
        "train: {optimizer: {lr: &lr 0.05}, scheduler: {warmup_lr: *lr}}\n"
    )
    cfg = load_config(write_config(text, "ok.yaml"))
    assert cfg.train.optimizer.lr == cfg.train.scheduler.warmup_lr == 0.05


# --- 5. weight files that are not weights ----------------------------------------------------


def _zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")


@pytest.mark.parametrize(
    ("name", "make", "found"),
    [
        ("notes.txt", lambda p: p.write_text("these are not weights\n"), "text"),
        ("model.pth", lambda p: p.write_text('{"weights": [1, 2]}'), "JSON text"),
        ("model.safetensors", lambda p: p.write_bytes(b""), "an empty file"),
        ("model.pt", _zip, "a zip archive"),
        ("model.bin", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), "a PNG image"),
    ],
)
def test_not_a_weights_file_is_a_config_error(tmp_path, name, make, found):
    from tlkd.models.factory import build_model

    path = tmp_path / name
    make(path)
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(name=MODEL, pretrained=str(path)), 3, None)
    assert info.value.key == "model.pretrained"
    assert "not a safetensors or PyTorch weights file" in str(info.value)
    assert f"(found {found})" in str(info.value) and str(path) in str(info.value)


def test_not_a_weights_file_cli_and_teacher(tmp_path, tiny_config, cli):
    from tlkd.distill.teacher import build_teacher

    text = tmp_path / "weights.pth"
    text.write_text("model: resnet18\n")
    result = cli("finetune", tiny_config(), f"model.pretrained={text}")
    assert result.exit_code == 2
    line = one_error(result)
    assert "model.pretrained" in line and "(found text)" in line
    assert "list index" not in line
    with pytest.raises(ConfigError) as info:
        build_teacher(TeacherConfig(name=MODEL, pretrained=str(text)), "teachers.1", (0,), (1,))
    assert info.value.key == "teachers.1.pretrained" and "(found text)" in str(info.value)


def test_damaged_weights_file_is_still_a_failure_while_running(tmp_path):
    from safetensors.torch import save_file

    from tlkd.models.factory import build_model

    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(TlkdError) as info:
        build_model(ModelConfig(name=MODEL, pretrained=str(path)), 3, None)
    assert not isinstance(info.value, ConfigError)
    assert "cannot read weights" in str(info.value)
