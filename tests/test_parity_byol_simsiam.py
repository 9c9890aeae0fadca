"""pretrain.method byol and simsiam against the reference code. BYOL: google-deepmind/
deepmind-research, byol/byol_experiment.py (loss_fn: the online network's prediction of
each view against the target's projection of the other, summed, mean over images;
_update_fn: the target's EMA with the updated online parameters, tau at the 0-based step),
byol/utils/helpers.py (l2_normalize, regression_loss) and byol/utils/schedules.py
(target_ema, _cosine_decay); the target starts as a copy of the online network, as lightly's
BYOL (lightly/models/utils.py update_momentum; DeepMind initialise it separately and report
no difference). SimSiam: facebookresearch/simsiam, simsiam/builder.py (the 3-layer projector
with the frozen output bias and the affine-free output BatchNorm, the predictor, z detached)
and main_simsiam.py (nn.CosineSimilarity, loss = -(D(p1, z2) + D(p2, z1)) / 2,
adjust_learning_rate with its fix_lr groups). The references are written here from those
files' conventions, independently of tlkd's code; then tiny ``tlkd pretrain`` runs of both
methods from YAML: the plan, the k-NN monitor, the backbone in finetune, an exact resume."""

from __future__ import annotations

import copy
import json
import math

import pytest
import timm
import torch
from conftest import MODEL, interrupted_and_resumed, small_config, write_images
from safetensors.torch import load_file
from timm.scheduler import create_scheduler_v2
from torch import nn

from tlkd.config.schema import PretrainConfig
from tlkd.engine.optim import FixedLrs
from tlkd.ssl.byol import BYOL, byol_loss, target_tau
from tlkd.ssl.simsiam import SimSiam, simsiam_loss

# --- BYOL, after deepmind-research byol/ --------------------------------------------------


def ref_l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """helpers.l2_normalize: x * rsqrt(max(sum x^2, eps)) over the last axis."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=eps))


def ref_regression_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """helpers.regression_loss: the squared distance of the normalised vectors, per row."""
    return ((ref_l2_normalize(x) - ref_l2_normalize(y)) ** 2).sum(-1)


def ref_target_ema(step: int, base_ema: float, max_steps: int) -> float:
    """schedules.target_ema with _cosine_decay(global_step, max_steps, 1.)."""
    step = min(step, max_steps)
    decay = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    return 1.0 - (1.0 - base_ema) * decay


def ref_byol_repr_loss(pred1, pred2, proj1_target, proj2_target) -> torch.Tensor:
    """byol_experiment.loss_fn's repr_loss (stop_gradient on the target's projections)."""
    loss = ref_regression_loss(pred1, proj2_target.detach())
    loss = loss + ref_regression_loss(pred2, proj1_target.detach())
    return loss.mean()


def ref_mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    """networks.MLP: linear (hidden), BatchNorm, ReLU, linear (out)."""
    return nn.Sequential(
        nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out)
    )


# --- SimSiam, after facebookresearch/simsiam ----------------------------------------------


def ref_simsiam_heads(prev_dim: int, dim: int, pred_dim: int) -> tuple[nn.Module, nn.Module]:
    """builder.SimSiam's projector (the encoder's new fc) and predictor."""
    fc = nn.Linear(prev_dim, dim)
    projector = nn.Sequential(
        nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(),
        nn.Linear(prev_dim, prev_dim, bias=False), nn.BatchNorm1d(prev_dim), nn.ReLU(),
        fc, nn.BatchNorm1d(dim, affine=False),
    )  # fmt: skip
    fc.bias.requires_grad = False  # the official "hack": a bias followed by BN is unused
    predictor = nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(),
        nn.Linear(pred_dim, dim),
    )  # fmt: skip
    return projector, predictor


def ref_simsiam_loss(p1, p2, z1, z2) -> torch.Tensor:
    """main_simsiam.train: criterion = nn.CosineSimilarity(dim=1); the builder detaches z."""
    criterion = nn.CosineSimilarity(dim=1)
    return -(criterion(p1, z2.detach()).mean() + criterion(p2, z1.detach()).mean()) * 0.5


def ref_adjust_learning_rate(groups: list[dict], init_lr: float, epoch: float, epochs: int):
    """main_simsiam.adjust_learning_rate: cosine without warm-up; fix_lr groups keep init_lr."""
    cur_lr = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    for group in groups:
        group["lr"] = init_lr if group.get("fix_lr") else cur_lr


# ------------------------------------------------------------------------------------------


def _backbone() -> nn.Module:
    """A tiny convolutional backbone with BatchNorm, 4 features."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.requires_grad]


def test_byol_parity_loss_and_gradient_with_stop_gradient():
    torch.manual_seed(0)
    p, z = torch.randn(2 * 6, 5) * 3, torch.randn(2 * 6, 5)
    a, b = p.clone().requires_grad_(), p.clone().requires_grad_()
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours = byol_loss(a, za)
    ref = ref_byol_repr_loss(*b.chunk(2), *zb.chunk(2))
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert za.grad is None  # the stop-gradient: nothing reaches the target's projections
    assert 0.0 <= ours.item() <= 8.0
    swap = lambda x: torch.cat(x.chunk(2)[::-1])  # noqa: E731  the views exchanged
    assert byol_loss(swap(p), swap(z)).item() == pytest.approx(ours.item())
    same = torch.cat([p[:6], p[:6]])  # the target agrees with the prediction: zero loss
    assert byol_loss(same, same).item() == pytest.approx(0.0, abs=1e-5)


def test_byol_parity_objective_loss_gradients_and_ema():
    """The whole step on a tiny backbone: loss and every online gradient as the reference's
    (each view through the networks on its own), no gradient in the target; then three
    optimizer steps, each followed by the EMA at tau(k) of the 0-based step k."""
    torch.manual_seed(0)
    model = _backbone()
    cfg = PretrainConfig(method="byol", proj_hidden=16, proj_dim=8, pred_hidden=12, tau_base=0.9)
    obj = BYOL(4, cfg)
    obj.attach(model)
    assert not any(p.requires_grad for p in obj.target_backbone.parameters())
    assert not any(p.requires_grad for p in obj.target_projector.parameters())
    # the reference: its own modules, the same starting weights
    r_backbone, r_proj, r_pred = copy.deepcopy(model), ref_mlp(4, 16, 8), ref_mlp(8, 12, 8)
    r_proj.load_state_dict(obj.projector.state_dict())
    r_pred.load_state_dict(obj.predictor.state_dict())
    r_t_backbone, r_t_proj = copy.deepcopy(r_backbone), copy.deepcopy(r_proj)
    online = [*model.parameters(), *obj.projector.parameters(), *obj.predictor.parameters()]
    r_online = [*r_backbone.parameters(), *r_proj.parameters(), *r_pred.parameters()]
    opt = torch.optim.SGD(online, lr=0.5)
    r_opt = torch.optim.SGD(r_online, lr=0.5)
    total = 10
    for update in (1, 2, 3):
        images = torch.randn(2 * 6, 3, 8, 8)
        v1, v2 = images.chunk(2)
        out = obj(model, images, torch.full((12,), -1))
        o1, o2 = r_proj(r_backbone(v1)), r_proj(r_backbone(v2))
        with torch.no_grad():
            t1, t2 = r_t_proj(r_t_backbone(v1)), r_t_proj(r_t_backbone(v2))
        ref = ref_byol_repr_loss(r_pred(o1), r_pred(o2), t1, t2)
        torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        r_opt.zero_grad()
        out.loss.backward()
        ref.backward()
        for ours, theirs in zip(online, r_online, strict=True):  # atol: biases before BN, ~0
            torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=2e-5)
        assert all(p.grad is None for p in obj.target_backbone.parameters())
        assert all(p.grad is None for p in obj.target_projector.parameters())
        opt.step()
        r_opt.step()
        obj.after_update(model, update, total)
        tau = ref_target_ema(update - 1, 0.9, total)
        assert obj.tau == pytest.approx(tau)
        with torch.no_grad():
            for target, new in ((r_t_backbone, r_backbone), (r_t_proj, r_proj)):
                for x, y in zip(target.parameters(), new.parameters(), strict=True):
                    x.copy_(x + (1 - tau) * (y - x))
        for ours, theirs in (
            (obj.target_backbone, r_t_backbone),
            (obj.target_projector, r_t_proj),
        ):
            for x, y in zip(ours.parameters(), theirs.parameters(), strict=True):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    # the target moved towards the online network, and is not it
    first = next(iter(obj.target_backbone.parameters()))
    assert not torch.equal(first, next(iter(model.parameters())))


def test_byol_parity_tau_schedule():
    for base in (0.99, 0.996, 0.5):
        for total in (1, 7, 1000):
            for k in range(0, total + 2):
                assert target_tau(k, total, base) == pytest.approx(ref_target_ema(k, base, total))
        assert target_tau(0, 1000, base) == pytest.approx(base)
        assert target_tau(500, 1000, base) == pytest.approx(1 - (1 - base) / 2)
        assert target_tau(1000, 1000, base) == pytest.approx(1.0)
    taus = [target_tau(k, 50, 0.99) for k in range(51)]
    assert taus == sorted(taus)


def test_simsiam_parity_loss_and_gradient_with_stop_gradient():
    torch.manual_seed(0)
    p, z = torch.randn(2 * 6, 5) * 2, torch.randn(2 * 6, 5)
    a, b = p.clone().requires_grad_(), p.clone().requires_grad_()
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    ours = simsiam_loss(a, za)
    ref = ref_simsiam_loss(*b.chunk(2), *zb.chunk(2))
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    assert za.grad is None  # the stop-gradient on z
    assert -1.0 <= ours.item() <= 1.0
    swapped = torch.cat(p.chunk(2)[::-1])  # each prediction equals the other view's z
    assert simsiam_loss(p, swapped).item() == pytest.approx(-1.0)


def test_simsiam_parity_objective_loss_and_gradients():
    """The official 3-layer projector (hidden = the backbone's width, the output layer's
    frozen bias, affine-free output BatchNorm) and predictor: the same loss and gradients
    on every trained parameter; z's branch gets its gradient only through the predictor."""
    torch.manual_seed(0)
    model = _backbone()
    cfg = PretrainConfig(method="simsiam", proj_layers=3, proj_hidden=4, proj_dim=8, pred_hidden=3)
    obj = SimSiam(4, cfg)
    r_backbone = copy.deepcopy(model)
    r_proj, r_pred = ref_simsiam_heads(4, 8, 3)
    missing = r_proj.load_state_dict(obj.projector.state_dict(), strict=False).missing_keys
    assert missing == ["6.bias"]  # ours has no bias there: BatchNorm removes a constant
    with torch.no_grad():
        r_proj[6].bias.normal_()
    r_pred.load_state_dict(obj.predictor.state_dict())
    images = torch.randn(2 * 6, 3, 8, 8)
    out = obj(model, images, torch.full((12,), -1))
    v1, v2 = images.chunk(2)
    z1, z2 = r_proj(r_backbone(v1)), r_proj(r_backbone(v2))
    ref = ref_simsiam_loss(r_pred(z1), r_pred(z2), z1, z2)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.backward()
    for ours, theirs in (
        (model, r_backbone),
        (obj.projector, r_proj),
        (obj.predictor, r_pred),
    ):
        for x, y in zip(_grads(ours), _grads(theirs), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=2e-5)
    # without the stop-gradient the backbone's gradient would differ
    model.zero_grad()
    obj.zero_grad()
    feats = [model(v1), model(v2)]
    z = [obj.projector(f) for f in feats]
    p = [obj.predictor(x) for x in z]
    cos = nn.functional.cosine_similarity
    no_stop = -(cos(p[0], z[1]).mean() + cos(p[1], z[0]).mean()) / 2
    no_stop.backward()
    assert not torch.allclose(
        next(iter(model.parameters())).grad, next(iter(r_backbone.parameters())).grad
    )


def test_simsiam_cifar_projector_and_fixed_predictor_lr():
    """The CIFAR variant (2 layers, the last BatchNorm without affine); with fix_pred_lr the
    predictor's group keeps the initial lr while the rest follows the cosine, as
    main_simsiam.adjust_learning_rate (here per update, as timm's scheduler steps)."""
    obj = SimSiam(16, PretrainConfig(method="simsiam", proj_hidden=32, proj_dim=32))
    kinds = [type(m).__name__ for m in obj.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert obj.projector[-1].affine is False and obj.projector[1].affine is True
    assert len(obj.param_groups()) == 1
    assert "16->32->32, prediction 32->512->32 (scheduled lr)" in SimSiam.plan_line(obj.cfg, 16)
    cfg = PretrainConfig(method="simsiam", proj_hidden=32, proj_dim=32, fix_pred_lr=True)
    obj = SimSiam(16, cfg)
    groups = obj.param_groups()
    assert [bool(g.get("fixed_lr")) for g in groups] == [False, True]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in obj.predictor.parameters()}
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]}, *groups], lr=0.05)
    inner, _ = create_scheduler_v2(
        opt, sched="cosine", num_epochs=4, warmup_epochs=0, min_lr=0.0, step_on_epochs=False,
        updates_per_epoch=5,
    )  # fmt: skip
    sched = FixedLrs(inner, opt)
    ref_groups = [{}, {}, {"fix_lr": True}]
    for update in range(1, 21):
        sched.step_update(update)
        ref_adjust_learning_rate(ref_groups, 0.05, update / 5, 4)
        for ours, theirs in zip(opt.param_groups, ref_groups, strict=True):
            assert ours["lr"] == pytest.approx(theirs["lr"], abs=1e-12)
    # a loaded optimizer state (new group dicts) keeps the fixed group fixed
    state = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(state)
    sched.load_state_dict(sched.state_dict())
    sched.step_update(10)
    assert opt.param_groups[2]["lr"] == 0.05 and opt.param_groups[0]["lr"] < 0.05


# --- tiny runs from YAML ------------------------------------------------------------------

METHODS = {
    "byol": (
        {"method": "byol", "proj_hidden": 16, "proj_dim": 8, "pred_hidden": 16, "tau_base": 0.9},
        "prediction 8->16->8, target network EMA tau 0.9->1",
    ),
    "simsiam": (
        {"method": "simsiam", "proj_hidden": 16, "proj_dim": 16, "pred_hidden": 8,
         "fix_pred_lr": True},
        "prediction 16->8->16 (fixed lr), stop-gradient",
    ),
}  # fmt: skip
LOGGED = ("train_loss", "val_top1", "lr")


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["byol", "simsiam"])
def test_pretrain_runs_loads_into_finetune_and_resumes_exactly(
    tmp_path, write_config, run_cli, monkeypatch, method
):
    """From YAML: the plan line; a finished run whose k-NN monitor is logged; the saved
    backbone (no heads, no target network) as finetune's model.pretrained; and a run stopped
    mid-epoch (SIGTERM's path) and resumed ending exactly as the uninterrupted one, the
    target network (BYOL) and the fixed predictor lr (SimSiam) included."""

    pretrain, plan = METHODS[method]
    train = write_images(tmp_path / "train", per_class=8, seed=1)
    val = write_images(tmp_path / "val", per_class=4, seed=2)
    cfg = small_config(tmp_path, None, val, train={"epochs": 2})
    cfg["data"]["unlabeled"] = str(train)
    cfg["data"]["augment"] = {"crop_mode": "rrc", "scale": [0.5, 1.0], "grayscale": 0.2}
    cfg["train"]["scheduler"] = {"name": "cosine", "warmup_epochs": 0}
    cfg["pretrain"] = {**pretrain, "knn_k": 3}
    config = write_config(cfg, "pre.yaml")
    proc = run_cli("pretrain", config, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"pretrain    {method} on 24 unlabelled images" in proc.stdout and plan in proc.stdout

    proc = run_cli("pretrain", config, "experiment=full")
    assert proc.returncode == 0, proc.stderr
    full = tmp_path / "runs" / "full"
    summary = json.loads((full / "summary.json").read_text())
    assert (summary["status"], summary["pretrain"]) == ("finished", method)
    rows = _rows(full)
    assert len(rows) == 2 and all(0 <= r["val_top1"] <= 100 for r in rows)
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    weights = load_file(full / "model.safetensors")
    assert set(weights) == set(timm.create_model(MODEL, num_classes=0).state_dict())
    state = torch.load(full / "checkpoint.pt", weights_only=True)
    heads = {k.split(".")[0] for k in state["objective"]}
    if method == "byol":
        assert heads == {"projector", "predictor", "target_projector", "target_backbone"}
        assert 0.9 < rows[0]["train_tau"] < rows[1]["train_tau"] < 1.0
        target = {k[len("target_backbone.") :] for k in state["objective"] if "backbone" in k}
        assert target == set(state["model"])
    else:
        assert heads == {"projector", "predictor"} and -1 <= rows[-1]["train_loss"] <= 1
        fixed = [g for g in state["optimizer"]["param_groups"] if g.get("fixed_lr")]
        assert len(fixed) == 1 and fixed[0]["lr"] == 0.01  # the predictor's: not decayed
        assert rows[-1]["lr"] < 0.01  # the scheduled groups' lr is logged

    ft = small_config(tmp_path, write_images(tmp_path / "ft", per_class=4, seed=3), val)
    ft["model"]["pretrained"] = str(full)
    ft["train"]["epochs"] = 1
    proc = run_cli("finetune", write_config(ft, "ft.yaml"), "experiment=ft")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "runs" / "ft" / "summary.json").read_text())
    assert summary["weights_source"] == str(full / "model.safetensors")

    # 3 updates per epoch: stopped after the first of epoch 2, then resumed
    part = interrupted_and_resumed(
        run_cli, monkeypatch, "pretrain", config, 4, tmp_path / "runs" / "part"
    )
    logged = (*LOGGED, "train_tau") if method == "byol" else LOGGED
    assert [{k: r[k] for k in logged} for r in _rows(part)] == [
        {k: r[k] for k in logged} for r in rows
    ]
    resumed = torch.load(part / "checkpoint.pt", weights_only=True)
    for section in ("model", "objective"):
        for key, value in state[section].items():
            assert torch.equal(value, resumed[section][key]), (section, key)
