"""The README's example experiment works as written, with real paths."""

import re

import yaml
from conftest import REPO, error_line


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Experiment files\n\n```yaml\n(.*?)```", text, re.S)
    assert block, "README lost its example experiment"
    return block.group(1)


def test_readme_example_runs_as_written(tmp_path, make_images, run_cli):
    make_images("data/flowers/train", per_class=3)
    make_images("data/flowers/val", per_class=2)
    (tmp_path / "flowers.yaml").write_text(_readme_example())
    raw = yaml.safe_load(_readme_example())
    assert raw["model"]["pretrained"] is True and raw["model"]["freeze"] == "backbone"
    # as written: hub weights, which this offline machine cannot download -> one clear line
    proc = run_cli("finetune", "flowers.yaml", "--dry-run")
    assert proc.returncode == 1
    assert "offline" in error_line(proc).lower()
    # the same experiment with local (random) weights builds and plans
    proc = run_cli("finetune", "flowers.yaml", "--dry-run", "model.pretrained=false")
    assert proc.returncode == 0, proc.stderr
    assert "freeze: backbone" in proc.stdout and "MLP [512]" in proc.stdout
    assert not (tmp_path / "runs").exists()
