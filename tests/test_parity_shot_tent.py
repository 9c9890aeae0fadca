"""Source-free adaptation (tlkd adapt, adapt.method: shot | tent) against the official code,
transcribed here independently of tlkd's: SHOT (tim-learn/SHOT, object/image_target.py:
the IM loss of train_target, obtain_label) and Tent (DequanWang/tent, tent.py:
configure_model, collect_params, softmax_entropy, forward_and_adapt; the Adam of cifar10c.py
and cfgs/tent.yaml). Then tiny runs from YAML: a source finetune run, and shot, tent offline
and tent online from it, without data.train, with exact resumes."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import MODEL, error_line, interrupted_and_resumed, small_config, write_images
from safetensors.torch import load_file
from torch import nn

from tlkd.adapt.shot import SHOT, cluster_labels, hypothesis, information_maximization
from tlkd.adapt.tent import Tent, softmax_entropy
from tlkd.config import load_config
from tlkd.config.schema import AdaptConfig

# --- transcription of tim-learn/SHOT, object/loss.py Entropy and image_target.py -----------


def ref_entropy(input_):
    epsilon = 1e-5
    entropy = -input_ * torch.log(input_ + epsilon)
    return torch.sum(entropy, dim=1)


def ref_im_loss(outputs_test, gent=True, ent_par=1.0, epsilon=1e-5):
    softmax_out = nn.Softmax(dim=1)(outputs_test)
    entropy_loss = torch.mean(ref_entropy(softmax_out))
    if gent:
        msoftmax = softmax_out.mean(dim=0)
        gentropy_loss = torch.sum(-msoftmax * torch.log(msoftmax + epsilon))
        entropy_loss -= gentropy_loss
    return entropy_loss * ent_par


def ref_cdist(a, b, metric):
    """scipy.spatial.distance.cdist for the two metrics obtain_label uses (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if metric == "cosine":
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        return 1.0 - (a @ b.T) / (na[:, None] * nb[None, :])
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2))


def ref_obtain_label(all_fea, all_output, distance="cosine", threshold=0, epsilon=1e-5):
    """obtain_label after the feature pass: ``all_fea`` features, ``all_output`` logits."""
    all_output = nn.Softmax(dim=1)(all_output)
    _, predict = torch.max(all_output, 1)
    predict = predict.numpy()
    if distance == "cosine":
        all_fea = torch.cat((all_fea, torch.ones(all_fea.size(0), 1)), 1)
        all_fea = (all_fea.t() / torch.norm(all_fea, p=2, dim=1)).t()
    all_fea = all_fea.float().cpu().numpy()
    K = all_output.size(1)
    aff = all_output.float().cpu().numpy()
    for _ in range(2):
        initc = aff.transpose().dot(all_fea)
        initc = initc / (1e-8 + aff.sum(axis=0)[:, None])
        cls_count = np.eye(K)[predict].sum(axis=0)
        labelset = np.where(cls_count > threshold)
        labelset = labelset[0]
        dd = ref_cdist(all_fea, initc[labelset], distance)
        pred_label = dd.argmin(axis=1)
        predict = labelset[pred_label]
        aff = np.eye(K)[predict]
    return predict.astype("int")


# --- transcription of DequanWang/tent, tent.py (and cifar10c.py's setup_optimizer) --------


def ref_softmax_entropy(x):
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def ref_forward_and_adapt(x, model, optimizer):
    outputs = model(x)
    loss = ref_softmax_entropy(outputs).mean(0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return outputs


def ref_collect_params(model):
    params, names = [], []
    for nm, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            for np_, p in m.named_parameters():
                if np_ in ["weight", "bias"]:
                    params.append(p)
                    names.append(f"{nm}.{np_}")
    return params, names


def ref_configure_model(model):
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def ref_optimizer(params):  # cfgs/tent.yaml: Adam, LR 1e-3, BETA 0.9, WD 0
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)


# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("diversity", [True, False])
def test_shot_parity_im_loss_and_gradient(diversity):
    torch.manual_seed(0)
    logits = (3 * torch.randn(16, 5)).requires_grad_(True)
    ours = information_maximization(logits, diversity)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = ref_im_loss(ref_logits, gent=diversity)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    # confident and diverse predictions score lower than uniform ones
    sharp = 20 * torch.eye(5).repeat(3, 1)
    assert information_maximization(sharp) < information_maximization(torch.zeros(15, 5))


@pytest.mark.parametrize(
    ("distance", "threshold"), [("cosine", 0), ("euclidean", 0), ("cosine", 9)]
)
def test_shot_parity_pseudo_labels_equal_obtain_label(distance, threshold):
    """On fixed features and logits (clusters the classifier half gets wrong): the same
    labels as SHOT's obtain_label; with threshold 9 a small class loses its centroid."""
    g = torch.Generator().manual_seed(1)
    classes, per, dim = 4, 30, 8
    centres = 3 * torch.randn(classes, dim, generator=g)
    truth = torch.arange(classes).repeat_interleave(per)
    feats = centres[truth] + torch.randn(len(truth), dim, generator=g) + 2.0
    logits = 2 * F.one_hot(truth, classes).float() + 1.5 * torch.randn(
        len(truth), classes, generator=g
    )
    if threshold:
        logits[:, 3] -= 4.0  # class 3 the argmax of a few images only
        logits[3 * per : 3 * per + 5, 3] += 10.0
        assert 0 < int((logits.argmax(1) == 3).sum()) <= threshold
    ours = cluster_labels(feats, logits, distance, threshold)
    ref = ref_obtain_label(feats.clone(), logits.clone(), distance, threshold)
    assert ours.tolist() == ref.tolist()
    assert (ours != logits.argmax(1)).any()  # the clustering changed some labels
    if threshold:
        assert 3 not in ours.tolist()


def test_shot_freezes_the_hypothesis_and_reads_its_input_features():
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=3)
    target = [(torch.randn(6, 3, 16, 16), torch.full((6,), -1)) for _ in range(2)]
    runtime = {"device": torch.device("cpu"), "dtype": None, "channels_last": False}
    shot = SHOT(AdaptConfig(method="shot"), None, runtime, target, model)
    assert hypothesis(model) is model.fc
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"fc.weight", "fc.bias"}
    assert not any(True for _ in shot.parameters())  # the model is not the objective's
    model.train()
    shot.start_epoch(1, 1)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    # the labels: obtain_label on the eval-mode pre-logits and logits of the target set
    model.eval()
    with torch.no_grad():
        images = torch.cat([x for x, _ in target])
        feats = model.forward_head(model.forward_features(images), pre_logits=True)
        logits = model.fc(feats)
    assert shot.labels.tolist() == ref_obtain_label(feats, logits).tolist()
    assert shot.labels_epoch == 1


def test_tent_parity_only_batchnorm_affine_trains():
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=3)
    Tent(AdaptConfig(method="tent"), None, {}, None, model)
    ours = {n for n, p in model.named_parameters() if p.requires_grad}
    ref_model = ref_configure_model(copy.deepcopy(model))
    _, names = ref_collect_params(ref_model)
    assert ours == set(names) and ours
    # the running statistics stay in the model (a standard timm state dict)
    assert set(model.state_dict()) == set(timm.create_model(MODEL, num_classes=3).state_dict())


def test_tent_parity_entropy_and_one_adaptation_step():
    """The same model copy adapted by tent.py's forward_and_adapt (configure_model's model,
    collect_params, Adam of cfgs/tent.yaml) and by tlkd's objective through timm's optimizer
    factory (as a run builds it): the same outputs, loss and updated parameters, and
    afterwards the same predictions in eval mode (batch statistics)."""
    torch.manual_seed(0)
    base = timm.create_model(MODEL, num_classes=3)
    with torch.no_grad():  # non-trivial BatchNorm running statistics and affine parameters
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ref_model = ref_configure_model(copy.deepcopy(base))
    ref_params, _ = ref_collect_params(ref_model)
    ref_opt = ref_optimizer(ref_params)
    model = copy.deepcopy(base)
    tent = Tent(AdaptConfig(method="tent"), None, {}, None, model)
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, opt="adam", lr=1e-3, weight_decay=0.0)
    x = [torch.randn(8, 3, 16, 16) + 0.5 for _ in range(3)]
    for batch in x:
        ref_out = ref_forward_and_adapt(batch, ref_model, ref_opt)
        model.train()
        out = tent(model, batch, torch.full((8,), -1))
        torch.testing.assert_close(out.loss, ref_softmax_entropy(ref_out).mean(0))
        torch.testing.assert_close(softmax_entropy(out.logits), ref_softmax_entropy(ref_out))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(out.logits, ref_out)
    ref_state = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_state[name], msg=name)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(model.get_parameter(n).requires_grad for n in changed)
    # eval mode: tent's model has no running statistics, so it normalises with the batch's;
    # tlkd's keeps them (BatchNorm's momentum followed the batches) and still uses the batch's
    model.eval()
    ref_model.eval()
    probe = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(probe), ref_model(probe))
    bn = model.bn1
    assert bn.running_mean is not None and not torch.equal(bn.running_mean, base.bn1.running_mean)


def test_tent_needs_batchnorm():
    from tlkd.errors import ConfigError

    with pytest.raises(ConfigError, match="BatchNorm"):
        Tent(AdaptConfig(method="tent"), None, {}, None, nn.Sequential(nn.Linear(3, 2)))


# --- end to end from YAML ------------------------------------------------------------------


@pytest.fixture
def source_run(tmp_path, write_config, run_cli):
    """Labelled clean squares -> a finished source run (the start of every method below),
    and the target domain: darker, noisier squares (unlabelled train, labelled val)."""
    source = write_images(tmp_path / "source", per_class=8, seed=1)
    target_tmp = write_images(tmp_path / "target_tmp", per_class=8, seed=3, noise=60)
    flat = tmp_path / "target"
    flat.mkdir()
    for i, f in enumerate(sorted(target_tmp.rglob("*.png"))):
        f.rename(flat / f"{i:03d}.png")
    target_val = write_images(tmp_path / "target_val", per_class=4, seed=4, noise=60)
    cfg = small_config(tmp_path, source, target_val, train={"epochs": 2})
    proc = run_cli("finetune", write_config(cfg, "src.yaml"), "experiment=src")
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "runs" / "src", flat, target_val


def _sf_config(tmp_path, source_run, method, epochs=2, **adapt):
    run, target, target_val = source_run
    cfg = small_config(tmp_path, None, target_val, train={"epochs": epochs})
    cfg["model"]["pretrained"] = str(run)
    cfg["data"]["unlabeled"] = str(target)
    cfg["adapt"] = {"method": method, **adapt}
    if method in ("tent", "shot"):  # the method's reference optimizer by default
        cfg["train"].pop("optimizer", None)
    if method == "tent":
        cfg["data"]["augment"] = {"policy": "none"}
        if adapt.get("online"):
            del cfg["data"]["unlabeled"]
    return cfg


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same(a, b, where=()):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            _same(a[key], b[key], (*where, key))
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _same_checkpoints(a, b):
    for section in ("model", "objective"):
        _same(a[section], b[section], (section,))


def test_shot_adapts_a_source_run_without_data_train_and_resumes_exactly(
    tmp_path, source_run, write_config, run_cli, monkeypatch
):
    config = write_config(_sf_config(tmp_path, source_run, "shot"), "shot.yaml")
    proc = run_cli("adapt", config, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "shot: source-free from" in proc.stdout and "24 unlabelled target images" in proc.stdout
    assert "classifier's last Linear frozen" in proc.stdout and "cosine distance" in proc.stdout
    proc = run_cli("adapt", config, "experiment=full")
    assert proc.returncode == 0, proc.stderr
    full = tmp_path / "runs" / "full"
    summary = json.loads((full / "summary.json").read_text())
    assert (summary["status"], summary["adapt"], summary["source_free"]) == (
        "finished",
        "shot",
        True,
    )
    assert summary["train_images"] == 0 and summary["target_images"] == 24
    rows = _rows(full)
    assert len(rows) == 2 and all(r["val_top1"] is not None for r in rows)
    assert all(math.isfinite(r["train_loss_im"]) and r["train_loss_pseudo"] >= 0 for r in rows)
    assert all(0 <= r["train_pseudo_agree"] <= 100 for r in rows)
    assert rows[0]["train_top1"] is None  # no labelled training rows
    src, ada = load_file(source_run[0] / "model.safetensors"), load_file(full / "model.safetensors")
    assert set(src) == set(ada)
    assert torch.equal(src["fc.weight"], ada["fc.weight"])  # the hypothesis is frozen
    assert not torch.equal(src["conv1.0.weight"], ada["conv1.0.weight"])
    state = torch.load(full / "checkpoint.pt", weights_only=True)
    assert state["objective"]["_extra_state"]["labels"].shape == (24,)

    # stopped after update 4 (3 updates per epoch: inside epoch 2), then resumed
    part = interrupted_and_resumed(
        run_cli, monkeypatch, "adapt", config, 4, tmp_path / "runs" / "part"
    )
    keys = ("train_loss", "train_loss_im", "train_loss_pseudo", "train_pseudo_agree", "val_top1")
    assert [{k: r[k] for k in keys} for r in _rows(part)] == [{k: r[k] for k in keys} for r in rows]
    _same_checkpoints(state, torch.load(part / "checkpoint.pt", weights_only=True))


def test_tent_offline_adapts_only_batchnorm(tmp_path, source_run, write_config, run_cli):
    cfg = _sf_config(tmp_path, source_run, "tent", epochs=1)
    proc = run_cli("adapt", write_config(cfg, "tent.yaml"), "experiment=tent")
    assert proc.returncode == 0, proc.stderr
    assert "offline: adapted on data.unlabeled" in proc.stdout
    # no train.optimizer: Tent's own (Adam, lr 1e-3, no weight decay), said and recorded
    plan = " ".join(proc.stdout.split())
    assert "optimizer: name adam, lr 0.001, weight_decay 0 (Tent's CIFAR-10-C setting" in plan
    run = tmp_path / "runs" / "tent"
    saved = load_config(run / "config.yaml")
    resolved = saved.resolved
    assert (resolved["train.optimizer.name"], resolved["train.optimizer.lr"]) == ("adam", 1e-3)
    assert resolved["train.optimizer.weight_decay"] == 0.0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["source_free"], summary["online"]) == (
        "finished",
        True,
        False,
    )
    n_bn = sum(
        m.weight.numel() + m.bias.numel()
        for m in timm.create_model(MODEL, num_classes=3).modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    assert summary["trainable_params"] == n_bn
    (row,) = _rows(run)
    assert row["val_top1"] is not None and row["train_loss_entropy"] > 0
    src, ada = load_file(source_run[0] / "model.safetensors"), load_file(run / "model.safetensors")
    differ = {k for k in src if not torch.equal(src[k], ada[k])}
    bn_keys = {k.rsplit(".", 1)[0] for k in differ}
    assert differ and all(k.endswith(("weight", "bias", "running_mean", "running_var",
                                      "num_batches_tracked")) for k in differ)  # fmt: skip
    assert "fc" not in bn_keys and not any(k.endswith("conv1.0.weight") for k in differ)
    # val_top1 normalised each val batch with its own statistics; the saved model (and so
    # tlkd evaluate) uses the running ones: both say so
    assert "running statistics" in summary["val_protocol"]
    assert "tlkd evaluate" in summary["val_protocol"]
    proc = run_cli("evaluate", run, "--no-speed")
    assert proc.returncode == 0, proc.stderr
    assert "note: a tent run: its val_top1 normalised each val batch" in " ".join(
        proc.stdout.split()
    )
    ev = json.loads((run / "eval.json").read_text())
    assert "running statistics saved in model.safetensors" in ev["note"]


def test_tent_offline_resumes_exactly_from_mid_epoch(
    tmp_path, source_run, write_config, run_cli, monkeypatch
):
    config = write_config(_sf_config(tmp_path, source_run, "tent", epochs=2), "tent.yaml")
    proc = run_cli("adapt", config, "experiment=full")
    assert proc.returncode == 0, proc.stderr
    full = tmp_path / "runs" / "full"
    rows = _rows(full)
    # stopped after update 4 (inside epoch 2 (3 updates per epoch)), then resumed
    part = interrupted_and_resumed(
        run_cli, monkeypatch, "adapt", config, 4, tmp_path / "runs" / "part"
    )
    keys = ("train_loss", "train_loss_entropy", "val_top1")
    assert [{k: r[k] for k in keys} for r in _rows(part)] == [{k: r[k] for k in keys} for r in rows]
    _same_checkpoints(
        torch.load(full / "checkpoint.pt", weights_only=True),
        torch.load(part / "checkpoint.pt", weights_only=True),
    )


def test_tent_online_scores_the_adapting_forwards_and_resumes_exactly(
    tmp_path, source_run, write_config, run_cli, monkeypatch
):
    config = write_config(
        _sf_config(tmp_path, source_run, "tent", epochs=1, online=True), "online.yaml"
    )
    proc = run_cli("adapt", config, "experiment=online")
    assert proc.returncode == 0, proc.stderr
    assert "online on the target val stream (12 images)" in proc.stdout
    assert "data.val in a fixed random order" in " ".join(proc.stdout.split())
    assert "scored by the forward that adapts on it" in proc.stdout
    run = tmp_path / "runs" / "online"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["online"] is True and "forward_and_adapt" in summary["val_protocol"]
    rows = _rows(run)
    assert len(rows) == 1  # one pass over the stream
    for r in rows:  # the trainer's top-1 of the same forwards, the labels being the val's
        assert r["val_top1"] == pytest.approx(r["train_top1"])
        assert r["adapted_val_top1"] is not None
    # stopped after update 1 (2 updates per pass (batches 8 + 4): inside it), then resumed
    part = interrupted_and_resumed(
        run_cli, monkeypatch, "adapt", config, 1, tmp_path / "runs" / "part"
    )
    keys = ("train_loss", "train_top1", "val_loss", "val_top1", "adapted_val_top1")
    assert [{k: r[k] for k in keys} for r in _rows(part)] == [{k: r[k] for k in keys} for r in rows]
    _same_checkpoints(
        torch.load(run / "checkpoint.pt", weights_only=True),
        torch.load(part / "checkpoint.pt", weights_only=True),
    )


@pytest.mark.parametrize("method, online", [("tent", False), ("tent", True), ("shot", False)])
def test_tent_reads_val_in_a_fixed_random_order(tmp_path, source_run, monkeypatch, method, online):
    """Tent normalises each val batch with its own statistics, so data.val and
    adapt.source_val (folders: class by class) are read in an order drawn with the subset
    seed, the same at every start; shot scores with running statistics and keeps the
    folders' order."""
    import tlkd.recipes.adapt as recipe
    from tlkd.config.loader import validate

    seen = []
    monkeypatch.setattr(recipe, "train", lambda exp, objective, *a, **k: seen.append(objective))
    monkeypatch.setattr(recipe, "build_experiment", _keeping(recipe.build_experiment, seen))
    extra = {"online": True} if online else {}
    cfg = _sf_config(tmp_path, source_run, method, epochs=1, **extra)
    cfg["adapt"]["source_val"] = cfg["data"]["val"]  # a labelled folder: class by class
    cfg = validate(cfg)
    recipe.adapt(cfg)
    recipe.adapt(cfg)
    exp, objective, exp2, _ = seen
    first, again = ([v.path(i) for i in range(len(v))] for v in (exp.splits.val, exp2.splits.val))
    assert first == again and sorted(first) == sorted(again)
    assert (first != sorted(first)) is (method == "tent")
    # the labels as the loaders deliver them: class by class for shot, mixed for tent
    stream = exp.loaders.train if online else exp.loaders.val
    for loader in (stream, objective.source_val):
        labels = torch.cat([y for _, y in loader]).tolist()
        assert (labels != sorted(labels)) is (method == "tent")


def _keeping(build, seen):
    def wrapped(*args, **kwargs):
        seen.append(build(*args, **kwargs))
        return seen[-1]

    return wrapped


def test_source_free_config_errors(tmp_path, source_run, write_config, run_cli):
    cfg = _sf_config(tmp_path, source_run, "shot")
    cfg["data"]["train"] = str(tmp_path / "source")
    proc = run_cli("adapt", write_config(cfg, "e1.yaml"))
    assert proc.returncode == 2 and error_line(proc).startswith("error: data.train:")
    assert "source-free" in error_line(proc)
    for pretrained in (False, True, "auto"):
        cfg = _sf_config(tmp_path, source_run, "tent")
        cfg["model"]["pretrained"] = pretrained
        proc = run_cli("adapt", write_config(cfg, "e2.yaml"))
        assert proc.returncode == 2 and error_line(proc).startswith("error: model.pretrained:")
    cfg = _sf_config(tmp_path, source_run, "tent", online=True)
    cfg["data"]["unlabeled"] = str(source_run[1])
    proc = run_cli("adapt", write_config(cfg, "e3.yaml"))
    assert proc.returncode == 2 and error_line(proc).startswith("error: data.unlabeled:")
    cfg = _sf_config(tmp_path, source_run, "shot")
    cfg["adapt"]["online"] = True  # tent's key
    proc = run_cli("adapt", write_config(cfg, "e4.yaml"))
    assert proc.returncode == 2 and "online" in error_line(proc)


def _fake_config(tmp_path, method, online=False, **sections):
    """A source-free config over paths that need not exist: the refusals come first."""
    cfg = small_config(tmp_path, None, tmp_path / "val", **sections)
    cfg["model"]["pretrained"] = str(tmp_path / "src")
    cfg["adapt"] = {"method": method, **({"online": True} if online else {})}
    if not online:
        cfg["data"]["unlabeled"] = str(tmp_path / "target")
    return cfg


@pytest.mark.parametrize(
    "method, online, sections, key",
    [
        ("tent", False, {"train": {"sync_bn": True}}, "train.sync_bn"),
        ("tent", True, {"train": {"sync_bn": True, "epochs": 1}}, "train.sync_bn"),
        ("shot", False, {"model": {"freeze": "backbone"}}, "model.freeze"),
        ("tent", False, {"model": {"freeze": ["layer1"], "unfreeze_after": 1}}, "model.freeze"),
        ("tent", True, {"train": {"epochs": 2}}, "train.epochs"),
        ("tent", True, {"train": {"epochs": 1, "accum_steps": 2}}, "train.accum_steps"),
    ],
)
def test_source_free_refusals_name_the_key(tmp_path, method, online, sections, key):
    """tent keeps its own BatchNorm layers (no SyncBatchNorm); shot and tent decide what
    trains (no model.freeze); online tent is one pass, one update per batch."""
    from tlkd.config.loader import validate
    from tlkd.errors import ConfigError
    from tlkd.recipes.adapt import adapt

    cfg = validate(_fake_config(tmp_path, method, online, **sections))
    with pytest.raises(ConfigError, match=rf"^{key}: ") as err:
        adapt(cfg, dry_run=True)
    assert err.value.key == key


def test_online_tent_refuses_torchrun(tmp_path, monkeypatch):
    """Online tent adapts on one stream in order: under torchrun (world size > 1) each
    process would adapt on its share, so it is refused."""
    from tlkd.config.loader import validate
    from tlkd.engine import distributed
    from tlkd.errors import ConfigError
    from tlkd.recipes.adapt import adapt

    cfg = validate(_fake_config(tmp_path, "tent", online=True, train={"epochs": 1}))
    monkeypatch.setattr(distributed, "_INFO", distributed.DistInfo(world=2, rank=0))
    with pytest.raises(ConfigError, match=r"^adapt\.online: .*2 torchrun processes"):
        adapt(cfg, dry_run=True)


def test_shot_indexes_target_batches_by_the_sampler_order_alone():
    """The target images are unlabelled (all -1): SHOT's loader wrapper has no labels to
    check the batches against (the order is the sampler's, which the loader draws from);
    a batch beyond the sampler's order is still an error."""
    from tlkd.engine.distributed import GlobalBatchSampler
    from tlkd.errors import TlkdError

    class Loader:
        def __init__(self, rows):
            self.sampler, self.generator, self.rows = GlobalBatchSampler(6, 3, 0), None, rows

        def __len__(self):
            return len(self.rows)

        def __iter__(self):
            for n in self.rows:
                yield torch.zeros(n, 3, 2, 2), torch.full((n,), -1)

    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=3)
    shot = SHOT(AdaptConfig(method="shot"), None, {}, None, model)
    wrapped = shot.wrap_train_loader(Loader([3, 3]))
    assert wrapped.labels is None
    order = list(iter(wrapped.sampler))
    assert [shot.slot.indices.tolist() for _ in wrapped] == [order[:3], order[3:]]
    assert shot.slot.indices is None
    with pytest.raises(TlkdError, match="more rows than its sampler's 6"):
        list(shot.wrap_train_loader(Loader([3, 3, 3])))


def test_source_free_image_size_and_augmentation_follow_the_source_run_and_target(
    tmp_path, write_config, run_cli
):
    """No data.train: the image size is the one model.pretrained's run directory was trained
    at (its config.yaml's resolved value, with its eval crop); from a weights file, the
    target images' own (data.unlabeled's, or data.val's online); the augmentation policy
    counts the target images. Each is a plan line with its reason."""
    import yaml
    from safetensors.torch import save_file

    target_tmp = write_images(tmp_path / "target_tmp", per_class=8, seed=3, size=40)
    flat = tmp_path / "target"
    flat.mkdir()
    for i, f in enumerate(sorted(target_tmp.rglob("*.png"))):
        f.rename(flat / f"{i:03d}.png")
    write_images(tmp_path / "val", per_class=4, seed=4, size=40)
    src = tmp_path / "src"
    src.mkdir()
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "model.safetensors")
    saved = {"model": {"name": MODEL}, "data": {"image_size": None, "crop_pct": None},
             "resolved": {"data.image_size": 48, "data.crop_pct": 0.9}}  # fmt: skip
    (src / "config.yaml").write_text(yaml.safe_dump(saved))

    def plan(method, pretrained, online=False, epochs=3):
        cfg = _fake_config(tmp_path, method, online, train={"epochs": epochs})
        cfg["model"]["pretrained"] = str(pretrained)
        del cfg["data"]["image_size"], cfg["data"]["crop_pct"], cfg["data"]["augment"]
        proc = run_cli("adapt", write_config(cfg, f"{method}.yaml"), "--dry-run")
        assert proc.returncode == 0, proc.stderr
        saved = yaml.safe_load(proc.stdout.split("resolved config:\n")[1].split("\n\n")[0])
        chosen = {k[5:]: v for k, v in saved["resolved"].items() if k.startswith("data.")}
        lines = {
            x.split(":")[0].split()[-1]: x.split(": ", 1)[1]
            for x in proc.stdout.splitlines()
            if x.startswith("default ")
        }
        return {**saved["data"], **chosen}, lines

    data, lines = plan("shot", src)
    assert (data["image_size"], data["crop_pct"]) == (48, 0.9)
    assert lines["image_size"] == "the size model.pretrained's run src was trained at (48px)"
    assert lines["augment"].startswith("light (auto: 3 epochs on 24 images of 40px:")
    data, lines = plan("shot", src / "model.safetensors")
    assert (data["image_size"], data["crop_pct"]) == (40, 1.0)
    assert lines["image_size"] == "the images' own size (median 40px)"
    data, lines = plan("tent", src / "model.safetensors", online=True, epochs=1)
    assert data["image_size"] == 40 and lines["augment"].startswith("none (auto: 1 epochs")
