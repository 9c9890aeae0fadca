"""`tlkd evaluate`: results equal a hand computation from the model's logits; ECE and the
confusion matrix on hand-made tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import MODEL, small_config
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from tlkd.engine.progress import Reporter
from tlkd.errors import ConfigError
from tlkd.recipes.evaluate import confusion_matrix, evaluate, expected_calibration_error

# --- unit: ECE and confusion -------------------------------------------------------------------


def test_ece_of_confident_correct_predictions_is_zero():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1, 0])) == pytest.approx(0.0)


def test_ece_of_confident_wrong_predictions_is_the_confidence():
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert expected_calibration_error(probs, torch.tensor([1, 0])) == pytest.approx(90.0)


def test_ece_separate_bins_weighted_by_share():
    # confidences 0.95 (right), 0.75 (wrong), 0.55 (right): each alone in its bin of 15
    probs = torch.tensor([[0.95, 0.05], [0.75, 0.25], [0.45, 0.55]])
    targets = torch.tensor([0, 1, 1])
    expected = 100 * ((1 - 0.95) + 0.75 + (1 - 0.55)) / 3
    assert expected_calibration_error(probs, targets) == pytest.approx(expected, rel=1e-5)


def test_ece_averages_within_a_bin_before_taking_the_gap():
    # both in the same bin: accuracy 0.5, confidence 0.91 -> gap 0.41, not (0.09 + 0.91) / 2
    probs = torch.tensor([[0.91, 0.09], [0.91, 0.09]])
    targets = torch.tensor([0, 1])
    assert expected_calibration_error(probs, targets) == pytest.approx(41.0, rel=1e-5)
    # with a single bin everything is one bin: |mean acc - mean conf|
    probs = torch.tensor([[0.95, 0.05], [0.25, 0.75], [0.6, 0.4]])
    targets = torch.tensor([0, 0, 0])
    expected = 100 * abs(2 / 3 - (0.95 + 0.75 + 0.6) / 3)
    assert expected_calibration_error(probs, targets, bins=1) == pytest.approx(expected, rel=1e-5)


def test_confusion_matrix_rows_are_true_columns_predicted():
    predicted = torch.tensor([0, 1, 1, 2, 2, 2])
    targets = torch.tensor([0, 0, 1, 2, 1, 2])
    assert confusion_matrix(predicted, targets, 3).tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert confusion_matrix(predicted, targets, 4).tolist() == [
        [1, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 2, 0],
        [0, 0, 0, 0],
    ]


# --- hand computation from the run's model -----------------------------------------------------


def hand_results(run_dir: Path, folder: Path) -> dict:
    """Load the run's weights into plain timm, run it over ``folder`` (ImageFolder order) with
    the eval transform at 16 px and crop 1.0 (a resize to the same size, i.e. none), and
    compute the metrics with plain torch."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    model = timm.create_model(MODEL, num_classes=len(classes))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    cfg = model.pretrained_cfg
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(cfg["mean"], cfg["std"])])
    images, targets = [], []
    for label, name in enumerate(classes):
        for file in sorted((folder / name).iterdir()):
            with Image.open(file) as img:
                images.append(tf(img.convert("RGB")))
            targets.append(label)
    targets = torch.tensor(targets)
    with torch.no_grad():
        logits = model(torch.stack(images))
    n, k = len(targets), len(classes)
    probs = logits.softmax(1)
    predicted = logits.argmax(1)
    confusion = [[0] * k for _ in range(k)]
    for t, p in zip(targets.tolist(), predicted.tolist(), strict=True):
        confusion[t][p] += 1
    top5 = sum(
        t in row
        for t, row in zip(targets.tolist(), logits.topk(min(5, k), 1).indices.tolist(), strict=True)
    )
    bins: dict[int, list[tuple[float, bool]]] = {}
    for conf, p, t in zip(
        probs.max(1).values.tolist(), predicted.tolist(), targets.tolist(), strict=True
    ):
        bins.setdefault(min(math.ceil(conf * 15) - 1, 14), []).append((conf, p == t))
    ece = sum(
        len(b) / n * abs(sum(ok for _, ok in b) / len(b) - sum(c for c, _ in b) / len(b))
        for b in bins.values()
    )
    return {
        "images": n,
        "classes": classes,
        "top1": 100 * sum(confusion[i][i] for i in range(k)) / n,
        "top5": 100 * top5 / n,
        "loss": -sum(math.log(probs[i, t].item()) for i, t in enumerate(targets.tolist())) / n,
        "ece": 100 * ece,
        "confusion": confusion,
        "per_class_top1": {
            c: 100 * confusion[i][i] / sum(confusion[i]) for i, c in enumerate(classes)
        },
        "logits": logits,
        "targets": targets,
    }


def assert_matches(results: dict, hand: dict) -> None:
    assert results["images"] == hand["images"]
    assert results["classes"] == hand["classes"]
    assert results["confusion"] == hand["confusion"]
    assert results["top1"] == pytest.approx(hand["top1"], rel=1e-6)
    assert results["top5"] == pytest.approx(hand["top5"], rel=1e-6)
    assert results["loss"] == pytest.approx(hand["loss"], rel=1e-4)
    assert results["loss"] == pytest.approx(
        F.cross_entropy(hand["logits"], hand["targets"]).item(), rel=1e-5
    )
    assert results["ece"] == pytest.approx(hand["ece"], rel=1e-4, abs=1e-4)
    assert results["per_class_top1"] == pytest.approx(hand["per_class_top1"], rel=1e-6)


def test_evaluate_run_dir_writes_eval_json_equal_to_hand_computation(trained_run, cli):
    result = cli("evaluate", trained_run.dir, "--no-speed")
    assert result.exit_code == 0, result.output
    results = json.loads((trained_run.dir / "eval.json").read_text())
    assert_matches(results, hand_results(trained_run.dir, trained_run.val))
    assert results["images"] == 12
    assert results["weights"] == str(trained_run.dir / "model.safetensors")
    assert "latency_ms" not in results  # --no-speed
    with Image.open(trained_run.dir / "confusion.png") as img:
        assert img.format == "PNG"
    # the run's best val top-1 was measured on the same images with the same weights
    summary = json.loads((trained_run.dir / "summary.json").read_text())
    assert results["top1"] == pytest.approx(summary["best_val_top1"])


def test_evaluate_on_another_val_folder(trained_run, make_images):
    other = make_images("other", per_class=5, seed=7)
    # mislabel some images, so the confusion matrix is not diagonal: 2 red squares filed as
    # blue, 1 green square filed as red
    for src, dst, name in [("red", "blue", "000"), ("red", "blue", "001"), ("green", "red", "002")]:
        (other / src / f"{name}.png").rename(other / dst / f"{src}-{name}.png")
    plain = evaluate(trained_run.dir, reporter=Reporter(quiet=True), speed=False)
    assert plain["overrides"] == [] and plain["eval_file"] == "eval.json"
    results = evaluate(
        trained_run.dir, [f"data.val={other}"], reporter=Reporter(quiet=True), speed=False
    )
    hand = hand_results(trained_run.dir, other)
    assert_matches(results, hand)
    assert results["images"] == 15
    assert results["top1"] < 100
    assert results["confusion"][0][2] >= 1  # a "blue" (true) predicted red
    # the plain evaluation stays eval.json; this one is named after its overrides
    name = results["eval_file"]
    assert name.startswith("eval-val-other-") and name.endswith(".json")
    on_disk = json.loads((trained_run.dir / name).read_text())
    assert on_disk["confusion"] == hand["confusion"]
    assert on_disk["overrides"] == [f"data.val={other}"]
    assert (
        trained_run.dir / name.replace("eval-", "confusion-").replace(".json", ".png")
    ).is_file()
    kept = json.loads((trained_run.dir / "eval.json").read_text())
    assert kept["images"] == 12 and kept["overrides"] == []


def test_evaluation_names_are_stable_and_distinct(trained_run, tmp_path, monkeypatch):
    from tlkd.config import load_config
    from tlkd.recipes.evaluate import overrides_slug

    cfg = load_config(trained_run.dir / "config.yaml", [f"data.val={tmp_path / 'a' / 'test'}"])
    slug = overrides_slug([f"data.val={tmp_path / 'a' / 'test'}"], cfg)
    assert slug.startswith("val-test-") and len(slug) == len("val-test-") + 6
    monkeypatch.chdir(tmp_path)  # a relative path to the same folder: the same name
    assert overrides_slug(["data.val=a/test"], load_config(None, ["data.val=a/test"])) == slug
    other = load_config(None, ["data.val=b/test"])
    assert overrides_slug(["data.val=b/test"], other) != slug  # same last folder, other path
    two = load_config(None, ["data.val=a/test", "train.batch_size=4"])
    assert overrides_slug(["data.val=a/test", "train.batch_size=4"], two).startswith(
        "val-test_batch_size-4-"
    )


def test_evaluate_another_val_folder_of_a_few_label_run(tmp_path, squares, write_config, cli):
    train, val = squares
    cfg = small_config(
        tmp_path, train, val, experiment="few", data={"samples_per_class": 3}, train={"epochs": 1}
    )
    assert cli("finetune", write_config(cfg)).exit_code == 0
    run = tmp_path / "runs" / "few"
    results = evaluate(run, [f"data.val={val}"], reporter=Reporter(quiet=True), speed=False)
    assert_matches(results, hand_results(run, val))


def test_evaluate_val_folder_with_other_classes_is_an_error(trained_run, make_images):
    other = make_images("other", classes=["cyan", "magenta", "yellow"], per_class=2)
    with pytest.raises(ConfigError, match="classes differ"):
        evaluate(trained_run.dir, [f"data.val={other}"], reporter=Reporter(quiet=True), speed=False)


def test_evaluate_config_file(trained_run, tmp_path, write_config, cli):
    cfg = small_config(
        tmp_path,
        trained_run.train,
        trained_run.val,
        experiment="fromfile",
        model={"pretrained": str(trained_run.dir)},
    )
    result = cli("evaluate", write_config(cfg, "eval.yaml"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "fromfile-eval"
    assert {"eval.json", "confusion.png", "config.yaml"} <= {p.name for p in out.iterdir()}
    results = json.loads((out / "eval.json").read_text())
    assert_matches(results, hand_results(trained_run.dir, trained_run.val))
    assert results["latency_ms"] > 0 and results["throughput_img_per_s"] > 0
    assert "top-1" in result.output


def test_evaluate_random_model_from_config(tmp_path, squares, write_config):
    cfg = small_config(tmp_path, *squares, experiment="random")
    results = evaluate(write_config(cfg), reporter=Reporter(quiet=True), speed=False)
    assert results["weights"] == "random"
    assert results["images"] == 12
    assert sum(map(sum, results["confusion"])) == 12
    assert Path(results["run_dir"]) == tmp_path / "runs" / "random-eval"


def test_evaluate_what_is_not_a_run(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ConfigError, match="not a tlkd run directory"):
        evaluate(tmp_path / "folder", reporter=Reporter(quiet=True), speed=False)
    with pytest.raises(ConfigError, match="no such run directory or config file"):
        evaluate(tmp_path / "nothing", reporter=Reporter(quiet=True), speed=False)
