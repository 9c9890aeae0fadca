"""tlkd export: the user sees the result line, not torch's deprecation notices."""

from __future__ import annotations

import warnings

import pytest


def test_torchscript_export_shows_no_torch_future_warning(trained_run, tmp_path, run_tlkd):
    out = tmp_path / "model.torchscript.pt"
    proc = run_tlkd("export", trained_run.dir, "--format", "torchscript", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "FutureWarning" not in proc.stderr + proc.stdout
    assert "deprecated" not in proc.stderr + proc.stdout
    assert proc.stdout.startswith(f"wrote {out}: outputs match PyTorch's")
    assert out.is_file()


def test_export_filters_only_torch_deprecations(trained_run, tmp_path):
    from tlkd.recipes.export import export, quiet_torch_deprecations

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = export(trained_run.dir, "torchscript", tmp_path / "m.pt")
    assert report["verified"]
    assert not [w for w in seen if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    # narrow: other warnings still show inside the filter
    with quiet_torch_deprecations(), pytest.warns(FutureWarning, match="something else"):
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)


def test_int8_export_scores_against_fp32_and_predicts(trained_run, tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    import json

    out = tmp_path / "new" / "m.onnx"  # -o makes its folder
    proc = run_cli("export", trained_run.dir, "-o", out, "--quantize", "int8", "--calibration", "6")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "new" / "m.onnx.json").read_text())
    q = report["int8"]
    int8 = tmp_path / "new" / "m.int8.onnx"
    assert q["kept"] and q["file"] == str(int8) and int8.is_file()
    assert q["calibration_images"] == 6 and q["val_images"] == 12
    assert q["drop"] == pytest.approx(q["fp32_top1"] - q["int8_top1"])
    assert q["int8_mb"] < q["fp32_mb"] and q["int8_latency_ms"] > 0
    assert f"wrote {int8}: val top-1 {q['int8_top1']:.2f}%" in proc.stdout
    # the fp32 file's top-1 through onnxruntime is evaluate's (same preprocessing, same model)
    from tlkd.engine.progress import Reporter
    from tlkd.recipes.evaluate import evaluate

    plain = evaluate(trained_run.dir, reporter=Reporter(quiet=True), speed=False)
    assert q["fp32_top1"] == pytest.approx(plain["top1"])
    # the int8 file has its own sidecar: predict runs it
    proc = run_cli("predict", int8, trained_run.val, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "12 of 12 images predicted" in proc.stdout


def test_int8_export_refuses_a_larger_drop(trained_run, tmp_path, run_cli, monkeypatch):
    pytest.importorskip("onnxruntime")
    import json

    from conftest import error_line

    from tlkd.recipes import quantize

    monkeypatch.setattr(quantize, "_top1", lambda sessions, batches: [90.0, 50.0])
    out = tmp_path / "m.onnx"
    proc = run_cli("export", trained_run.dir, "-o", out, "--quantize", "int8", "--max-drop", "2")
    assert proc.returncode == 1
    assert "is 40.00 points below fp32's 90.00%" in error_line(proc)
    assert not (tmp_path / "m.int8.onnx").exists() and out.is_file()
    assert json.loads((tmp_path / "m.onnx.json").read_text())["int8"]["kept"] is False
    proc = run_cli("export", trained_run.dir, "--format", "torchscript", "--quantize", "int8")
    assert proc.returncode == 2 and "--quantize" in error_line(proc)
