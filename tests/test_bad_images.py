"""Unreadable image files: named in one error line, or skipped and counted on request."""

import json

import pytest
from conftest import error_line


def _break(folder):
    bad = sorted((folder / "red").iterdir())[0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return bad


@pytest.mark.parametrize("workers", [0, 1])  # in the main process, and in a loader worker
def test_bad_image_is_named(tmp_path, squares, tiny_config, run_cli, workers):
    bad = _break(squares[0])
    proc = run_cli("finetune", tiny_config(data={"num_workers": workers}))
    assert proc.returncode == 1
    line = error_line(proc)
    assert str(bad) in line and "data.skip_bad_images" in line


def test_bad_images_skipped_and_counted(tmp_path, squares, tiny_config, run_cli):
    bad = _break(squares[0])
    bad_val = _break(squares[1])
    proc = run_cli("finetune", tiny_config(data={"skip_bad_images": True}))
    assert proc.returncode == 0, proc.stderr
    assert "skipped     2 unreadable images" in proc.stdout
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["skipped_images"] == 2
    assert set(summary["skipped_image_files"]) == {str(bad), str(bad_val)}
    assert summary["train_images"] == 3 * 8 - 1 and summary["val_images"] == 3 * 4 - 1
