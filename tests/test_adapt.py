"""Transductive and unsupervised transfer: tlkd adapt (AdaBN, pseudo-labels, DANN) and
tlkd pretrain (SimCLR): each method's mechanics, and the commands end to end on tiny data."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torchvision
import yaml
from conftest import error_line, small_config, write_images
from PIL import Image

from tlkd.adapt.adabn import reestimate_bn
from tlkd.adapt.grl import dann_lambda, reverse_gradient
from tlkd.adapt.objectives import pseudo_labels
from tlkd.data.datasets import LabeledImages, UnlabeledFolder, unlabeled
from tlkd.ssl.knn import knn_top1
from tlkd.ssl.simclr import nt_xent


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)  # identity forward
    (y * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * torch.arange(3.0).expand(4, 3))
    assert dann_lambda(0, 100) == 0.0 and 0.99 < dann_lambda(100, 100) < 1.0


def test_adabn_changes_only_batchnorm_statistics():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = [(torch.randn(8, 3, 16, 16) * 2 + 1, torch.full((8,), -1)) for _ in range(3)]
    assert reestimate_bn(model, target, torch.device("cpu")) == 24
    after = model.state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(stats) for k in changed)
    assert any(k.endswith("running_mean") for k in changed)
    assert not model.training  # modes restored
    # the exact average over the target data, not a momentum-weighted one: computed here
    # from the stem's convolutions, each BatchNorm normalising with its batch's statistics
    # as it does while re-estimating (stem: conv, bn, relu, conv, bn, relu, conv)
    stem = model.conv1
    convs, bns = (stem[0], stem[3], stem[6]), (stem[1], stem[4], model.bn1)
    inputs: list[list[torch.Tensor]] = [[], [], []]  # per BatchNorm, its input per batch
    with torch.no_grad():
        for images, _ in target:
            h = images
            for i, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
                x = conv(h)
                inputs[i].append(x)
                mean = x.mean((0, 2, 3), keepdim=True)
                var = x.var((0, 2, 3), unbiased=False, keepdim=True)
                w, b = bn.weight[None, :, None, None], bn.bias[None, :, None, None]
                h = torch.relu((x - mean) / torch.sqrt(var + bn.eps) * w + b)
    for bn, xs in zip(bns, inputs, strict=True):
        # the mean over all target images (equal batches); the var is the average of the
        # batches' unbiased variances, as BatchNorm with momentum None accumulates it
        whole = torch.cat(xs)
        torch.testing.assert_close(bn.running_mean, whole.mean((0, 2, 3)))
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in xs]).mean(0)
        torch.testing.assert_close(bn.running_var, var)
        assert bn.num_batches_tracked == len(target)
        assert bn.momentum == 0.1  # the model's own momentum is back


def test_unlabeled_images_come_in_a_fixed_random_order(tmp_path):
    """A folder lists its images class by class; unlabeled() shuffles them with the seed
    (the same subset as before under a limit), so a pass in order mixes the classes."""
    folder = write_images(tmp_path / "t", per_class=10)
    paths = [path for path, _ in UnlabeledFolder(folder).samples]
    assert paths == sorted(paths)  # the folder's own order: class by class
    a, b = unlabeled(folder, seed=0), unlabeled(folder, seed=0)
    order = [a.path(i) for i in range(len(a))]
    assert order == [b.path(i) for i in range(len(b))]  # fixed by the seed
    assert sorted(order) == paths and order != paths
    other = unlabeled(folder, seed=1)
    assert [other.path(i) for i in range(len(other))] != order
    assert [a.path(i) for i in range(12)] == [unlabeled(folder, 12, 0).path(i) for i in range(12)]
    # the first batch of 10 holds more than one class (folder order: one class only)
    assert len({p.split("/")[-2] for p in order[:10]}) > 1


def test_adabn_statistics_are_the_whole_target_sets_in_shuffled_order(tmp_path):
    """AdaBN's variance is the average of per-batch variances: class-by-class batches give the
    within-class spread only; shuffled ones the whole set's (Li et al.'s target statistics)."""
    folder = write_images(tmp_path / "t", per_class=40, noise=10)
    to_tensor = torchvision.transforms.functional.pil_to_tensor

    def batches(images):
        pixels = torch.stack([to_tensor(Image.open(images.path(i))) for i in range(len(images))])
        return [(x.float(), x.new_zeros(len(x))) for x in pixels.split(20)]

    everything = torch.cat([x for x, _ in batches(unlabeled(folder))])
    population = everything.transpose(0, 1).flatten(1).var(dim=1)
    listed = UnlabeledFolder(folder)
    estimates = {}
    for name, images in {
        "folder": LabeledImages(listed, listed.targets, []),
        "shuffled": unlabeled(folder),
    }.items():
        bn = torch.nn.BatchNorm2d(3)
        reestimate_bn(bn, batches(images), torch.device("cpu"))
        estimates[name] = bn.running_var
    torch.testing.assert_close(estimates["shuffled"], population, rtol=0.15, atol=0)
    assert (estimates["folder"] < 0.2 * population).all()


def test_target_bn_normalises_each_domain_with_its_own_statistics():
    from tlkd.adapt.objectives import PseudoLabel
    from tlkd.config.schema import AdaptConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    images = torch.cat([torch.randn(4, 3, 2, 2), 5 + 3 * torch.randn(4, 3, 2, 2)])
    targets = torch.tensor([0, -1, 1, -1, 2, -1, -1, 0])  # domains interleaved
    src, tgt = targets >= 0, targets < 0
    per_domain = PseudoLabel(AdaptConfig(method="pseudo_label", target_bn=True), None, {})
    out = per_domain.run(model, images, targets)
    assert torch.allclose(out[src], model(images[src]), atol=1e-5)
    assert torch.allclose(out[tgt], model(images[tgt]), atol=1e-5)
    # each domain's rows have zero mean per channel: normalised with their own statistics
    assert out[tgt].mean(dim=(0, 2, 3)).abs().max() < 1e-4
    shared = PseudoLabel(AdaptConfig(method="pseudo_label"), None, {})  # the default
    joint = shared.run(model, images, targets)
    assert torch.allclose(joint, model(images), atol=1e-5)
    assert joint[tgt].mean(dim=(0, 2, 3)).abs().max() > 0.1


def test_pseudo_labels_respect_the_threshold():
    probs = torch.tensor([[0.96, 0.04], [0.5, 0.5], [0.05, 0.95], [0.2, 0.8]])
    labels, keep = pseudo_labels(probs, 0.95)
    assert labels.tolist() == [0, 0, 1, 1] and keep.tolist() == [True, False, True, False]


def test_nt_xent_prefers_matching_views_and_falls_when_trained():
    torch.manual_seed(0)
    a = torch.randn(16, 8)
    assert nt_xent(torch.cat([a, a]), 0.2) < nt_xent(torch.cat([a, torch.randn(16, 8)]), 0.2)
    # a toy problem: an encoder learns to map two noisy views of each point together
    points = torch.randn(64, 10)
    encoder = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    opt = torch.optim.Adam(encoder.parameters(), 1e-2)
    losses = []
    for _ in range(60):
        views = torch.cat([points + 0.3 * torch.randn_like(points) for _ in range(2)])
        loss = nt_xent(encoder(views), 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # chance: 2 log(2N - 1) (SimCLR's code sums the a->b and b->a terms)
    assert last < 0.7 * first and last < 0.5 * 2 * math.log(127)


def test_knn_scores_separable_features():
    labels = torch.arange(3).repeat_interleave(10)
    feats = torch.nn.functional.one_hot(labels, 3).float() + 0.05 * torch.randn(30, 3)
    assert knn_top1(feats, labels, k=5) == 100.0
    assert knn_top1(torch.randn(30, 3), labels, k=5) < 80.0


@pytest.fixture
def domains(tmp_path):
    """Source: clean squares; target: the same colours, darker and noisier (unlabelled train
    in one flat folder, labelled val)."""
    source = write_images(tmp_path / "source", per_class=8, seed=1)
    source_val = write_images(tmp_path / "source_val", per_class=4, seed=2)
    target_train = write_images(tmp_path / "target_tmp", per_class=8, seed=3, noise=60)
    flat = tmp_path / "target"
    flat.mkdir()
    for i, f in enumerate(sorted(target_train.rglob("*.png"))):
        f.rename(flat / f"{i:03d}.png")
    target_val = write_images(tmp_path / "target_val", per_class=4, seed=4, noise=60)
    return source, source_val, flat, target_val


def _adapt_cfg(tmp_path, domains, method, **train):
    source, source_val, target, target_val = domains
    cfg = small_config(tmp_path, source, target_val, train={"epochs": 2, **train})
    cfg["data"]["unlabeled"] = str(target)
    cfg["adapt"] = {"method": method, "source_val": str(source_val)}
    if method == "pseudo_label":
        cfg["adapt"]["threshold"] = 0.5
    return cfg


@pytest.mark.parametrize("method", ["pseudo_label", "dann"])
def test_adapt_trains_and_logs_both_domains(tmp_path, domains, write_config, run_cli, method):
    cfg = _adapt_cfg(tmp_path, domains, method)
    proc = run_cli("adapt", write_config(cfg), f"experiment={method}")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / method
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(r["val_top1"] is not None and r["source_val_top1"] is not None for r in rows)
    extra = "train_loss_pseudo" if method == "pseudo_label" else "train_loss_domain"
    assert extra in rows[-1] and rows[-1]["train_img_per_s"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "adapt" and summary["target_images"] == 24
    # the saved model is the plain timm model: no discriminator inside
    from safetensors.torch import load_file

    assert not any("discriminator" in k for k in load_file(run / "model.safetensors"))
    proc = run_cli("evaluate", run, "--no-speed")
    assert proc.returncode == 0, proc.stderr


def test_adabn_without_training_adapts_a_source_run(tmp_path, domains, write_config, run_cli):
    source, _, _, target_val = domains
    base = small_config(tmp_path, source, target_val, train={"epochs": 1})
    assert run_cli("finetune", write_config(base, "src.yaml"), "experiment=src").returncode == 0
    cfg = _adapt_cfg(tmp_path, domains, "adabn", epochs=0)
    cfg["model"]["pretrained"] = str(tmp_path / "runs" / "src")
    proc = run_cli("adapt", write_config(cfg), "experiment=adabn")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "adabn"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 0 and rows[0]["val_top1"] is not None
    from safetensors.torch import load_file

    src, ada = (
        load_file(tmp_path / "runs" / "src" / "model.safetensors"),
        load_file(run / "model.safetensors"),
    )
    differ = {k for k in src if not torch.equal(src[k], ada[k])}
    assert differ and all("running_" in k or "num_batches" in k for k in differ)


def test_adapt_config_errors(tmp_path, domains, write_config, run_cli):
    cfg = _adapt_cfg(tmp_path, domains, "dann")
    del cfg["data"]["unlabeled"]
    proc = run_cli("adapt", write_config(cfg))
    assert proc.returncode == 2 and error_line(proc).startswith("error: data.unlabeled:")
    cfg = _adapt_cfg(tmp_path, domains, "dann", epochs=0)
    proc = run_cli("adapt", write_config(cfg))
    assert proc.returncode == 2 and "train.epochs" in error_line(proc)
    cfg = _adapt_cfg(tmp_path, domains, "dan")
    proc = run_cli("adapt", write_config(cfg))
    assert proc.returncode == 2 and "adapt.method" in error_line(proc)


def test_pretrain_saves_a_backbone_that_finetune_loads(tmp_path, domains, write_config, run_cli):
    source, _, target, target_val = domains
    cfg = small_config(tmp_path, None, target_val, train={"epochs": 2})
    cfg["data"]["unlabeled"] = str(target)
    cfg["data"]["augment"] = {"crop_mode": "rrc", "scale": [0.5, 1.0], "grayscale": 0.2}
    cfg["pretrain"] = {"temperature": 0.5, "knn_k": 3}
    proc = run_cli("pretrain", write_config(cfg, "pre.yaml"), "experiment=pre")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "pre"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["val_top1"] <= 100 and r["val_loss"] is None for r in rows)
    assert rows[0]["train_loss"] > 0
    from safetensors.torch import load_file

    weights = load_file(run / "model.safetensors")
    assert not any(k.startswith("fc.") or "projector" in k for k in weights)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["resolved"]["model.num_classes"] == 0
    ft = small_config(tmp_path, source, target_val, train={"epochs": 1})
    ft["model"]["pretrained"] = str(run)
    proc = run_cli("finetune", write_config(ft, "ft.yaml"), "experiment=ft")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "runs" / "ft" / "summary.json").read_text())
    assert summary["weights_source"] == str(run / "model.safetensors")


def test_an_adapted_teacher_teaches_a_student_on_the_target(
    tmp_path, domains, write_config, run_cli
):
    """Composable with distillation: the student learns from labelled source batches (ce) and
    from the adapted teacher on unlabelled target batches joined to them (kd)."""
    cfg = _adapt_cfg(tmp_path, domains, "dann", epochs=1)
    assert run_cli("adapt", write_config(cfg, "a.yaml"), "experiment=teacher").returncode == 0
    source, _, target, target_val = domains
    kd = small_config(tmp_path, source, target_val, train={"epochs": 1})
    kd["data"]["unlabeled"] = str(target)
    kd["teacher"] = {"name": kd["model"]["name"], "pretrained": str(tmp_path / "runs/teacher")}
    kd["distill"] = {"losses": [{"type": "kd", "weight": 0.9}, {"type": "ce", "weight": 0.1}]}
    proc = run_cli("distill", write_config(kd, "kd.yaml"), "experiment=student")
    assert proc.returncode == 0, proc.stderr
    assert "24 images" in proc.stdout and "teacher losses only" in proc.stdout
    row = json.loads((tmp_path / "runs/student/metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_loss_kd"] > 0 and row["train_loss_ce"] > 0 and row["val_top1"] is not None
    kd["distill"]["losses"][1] = {"type": "dkd", "weight": 0.1}
    proc = run_cli("distill", write_config(kd, "kd.yaml"))
    assert proc.returncode == 2 and error_line(proc).startswith("error: distill.losses.1:")
    del kd["teacher"], kd["distill"]
    proc = run_cli("finetune", write_config(kd, "ft.yaml"))
    assert proc.returncode == 2 and error_line(proc).startswith("error: data.unlabeled:")
