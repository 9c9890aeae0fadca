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
