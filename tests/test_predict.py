"""tlkd predict: evaluate's preprocessing and model, on files, folders and globs; rows to
CSV/JSONL; unreadable images skipped and counted; the ONNX export predicts the same."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import error_line

from tlkd.engine.progress import Reporter
from tlkd.recipes import evaluate as evaluate_module
from tlkd.recipes.predict import predict


def test_predict_on_the_val_folder_gives_evaluates_probabilities_and_top1(trained_run, monkeypatch):
    seen = {}
    real = evaluate_module.predict

    def spy(*args, **kwargs):
        seen["logits"], seen["targets"] = real(*args, **kwargs)
        return seen["logits"], seen["targets"]

    monkeypatch.setattr(evaluate_module, "predict", spy)
    results = evaluate_module.evaluate(trained_run.dir, reporter=Reporter(quiet=True), speed=False)
    out = predict(trained_run.dir, [str(trained_run.val)], topk=2, reporter=Reporter(quiet=True))
    rows = out["rows"]
    # the same images in the same order (ImageFolder: sorted classes, sorted files)
    assert [Path(r["path"]).parent.name for r in rows] == [
        trained_run.classes[t] for t in seen["targets"].tolist()
    ]
    probs = seen["logits"].softmax(dim=1)
    got = torch.tensor([r["probability"] for r in rows])
    assert torch.allclose(got, probs.max(dim=1).values, atol=1e-5)
    assert [r["class"] for r in rows] == [trained_run.classes[i] for i in probs.argmax(1)]
    correct = sum(r["class"] == Path(r["path"]).parent.name for r in rows)
    assert 100.0 * correct / len(rows) == pytest.approx(results["top1"])
    # top-k: k classes, best first, the first the prediction
    for r in rows:
        assert len(r["topk"]) == 2 and r["topk"][0]["class"] == r["class"]
        assert r["topk"][0]["probability"] >= r["topk"][1]["probability"]


def test_predict_cli_files_globs_outputs_and_unreadable_images(trained_run, tmp_path, run_cli):
    images = tmp_path / "in"
    shutil.copytree(trained_run.val, images)
    (images / "red" / "broken.png").write_bytes(b"not an image")
    (images / "notes.txt").write_text("not an image file: a folder search skips it")
    out = tmp_path / "preds" / "p.csv"
    proc = run_cli("predict", trained_run.dir, images, "--out", out, "--topk", "9")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable images" in proc.stdout and "broken.png" in proc.stdout
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12  # 3 classes x 4 images; the broken one is not a row
    assert all(len(r["topk"].split(";")) == 3 for r in rows)  # k capped at the 3 classes
    # a quoted glob, and a file named twice, count once; JSON lines
    jsonl = tmp_path / "p.jsonl"
    one = images / "blue" / "000.png"
    proc = run_cli("predict", trained_run.dir, str(images / "*" / "00[01].png"), one, "-o", jsonl)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(lines) == 6 and {Path(r["path"]).name for r in lines} == {"000.png", "001.png"}


def test_predict_errors(trained_run, tmp_path, run_cli):
    proc = run_cli("predict", trained_run.dir, tmp_path / "nothing-here")
    assert proc.returncode == 2 and "no image files found" in error_line(proc)
    proc = run_cli("predict", tmp_path, trained_run.val)
    assert proc.returncode == 2 and "not a tlkd run directory" in error_line(proc)
    proc = run_cli("predict", trained_run.dir, trained_run.val, "--out", tmp_path / "x.txt")
    assert proc.returncode == 2 and "--out" in error_line(proc)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    proc = run_cli("predict", trained_run.dir, bad)
    assert proc.returncode == 1 and "none of the 1 images could be read" in error_line(proc)


def test_predict_with_the_onnx_export_matches_the_run(trained_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from tlkd.recipes.export import export

    onnx_file = tmp_path / "m.onnx"
    export(trained_run.dir, "onnx", onnx_file)
    quiet = Reporter(quiet=True)
    a = predict(trained_run.dir, [str(trained_run.val)], reporter=quiet)["rows"]
    b = predict(onnx_file, [str(trained_run.val)], reporter=quiet)["rows"]
    assert [r["class"] for r in a] == [r["class"] for r in b]
    assert max(abs(x["probability"] - y["probability"]) for x, y in zip(a, b, strict=True)) < 1e-4
