"""adapt.method mcc and cdan against the reference code, thuml/Transfer-Learning-Library:
tllib/self_training/mcc.py (MinimumClassConfusionLoss), tllib/alignment/cdan.py
(ConditionalDomainAdversarialLoss, MultiLinearMap, RandomizedMultiLinearMap),
tllib/modules/grl.py (WarmStartGradientReverseLayer), tllib/modules/entropy.py and
tllib/modules/domain_discriminator.py, trained as its examples do
(examples/domain_adaptation/image_classification/{mcc,cdan}.py: source and target in one
batch, loss = source cross-entropy + trade-off x transfer loss). The references are written
here from those files' conventions, independently of tlkd's code; then tiny ``tlkd adapt``
runs of both methods, with an exact resume."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import interrupted_and_resumed, small_config, write_images
from safetensors.torch import load_file
from torch import nn

from tlkd.adapt.cdan import CDAN, MultilinearMap, RandomizedMultilinearMap, cdan_loss
from tlkd.adapt.mcc import MCC, mcc_loss
from tlkd.config.schema import AdaptConfig

# --- the reference, after tllib's conventions ---------------------------------------------


def ref_entropy(p: torch.Tensor) -> torch.Tensor:
    """tllib/modules/entropy.py: per row, with 1e-5 inside the log."""
    return (-p * torch.log(p + 1e-5)).sum(dim=1)


def ref_mcc(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tllib/self_training/mcc.py, MinimumClassConfusionLoss.forward, step by step
    (including its division by the un-kept-dim row sums, which scales columns)."""
    n, c = logits.shape
    p = torch.softmax(logits / temperature, dim=1)
    ew = 1 + torch.exp(-ref_entropy(p).detach())
    ew = (n * ew / ew.sum()).unsqueeze(1)
    ccm = torch.mm((p * ew).t(), p)
    ccm = ccm / ccm.sum(dim=1)
    return (ccm.sum() - torch.trace(ccm)) / c


class RefReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x * 1.0

    @staticmethod
    def backward(ctx, grad):
        return grad.neg() * ctx.coeff, None


class RefWarmStartGRL:
    """tllib/modules/grl.py, WarmStartGradientReverseLayer; ``coeff`` kept for the test."""

    def __init__(self, alpha=1.0, lo=0.0, hi=1.0, max_iters=1000.0, auto_step=False):
        self.alpha, self.lo, self.hi, self.max_iters = alpha, lo, hi, max_iters
        self.iter_num, self.auto_step, self.coeff = 0, auto_step, None

    def __call__(self, x):
        span = self.hi - self.lo
        self.coeff = float(
            2.0 * span / (1.0 + np.exp(-self.alpha * self.iter_num / self.max_iters))
            - span
            + self.lo
        )
        if self.auto_step:
            self.iter_num += 1
        return RefReverse.apply(x, self.coeff)


def ref_multilinear(f, g):
    """tllib's MultiLinearMap: the batched outer product g f^T, flattened."""
    return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).view(f.size(0), -1)


def ref_randomized(rf, rg, f, g):
    """tllib's RandomizedMultiLinearMap with its (given) random matrices."""
    return torch.mul(torch.mm(f, rf), torch.mm(g, rg)) / np.sqrt(float(rf.shape[1]))


def ref_discriminator(width: int, hidden: int) -> nn.Sequential:
    """tllib/modules/domain_discriminator.py with batch_norm=True: P(source)."""
    return nn.Sequential(
        nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()),
    )  # fmt: skip


def ref_cdan(disc, grl, mapping, entropy, g_s, f_s, g_t, f_t):
    """tllib/alignment/cdan.py, ConditionalDomainAdversarialLoss.forward (sigmoid, mean)."""
    f = torch.cat((f_s, f_t), dim=0)
    g = F.softmax(torch.cat((g_s, g_t), dim=0), dim=1).detach()
    d = disc(grl(mapping(f, g)))
    w = 1.0 + torch.exp(-ref_entropy(g))
    w = w / torch.sum(w) * f.size(0)
    label = torch.cat((torch.ones((g_s.size(0), 1)), torch.zeros((g_t.size(0), 1))))
    if entropy:
        return F.binary_cross_entropy(d, label, w.view_as(d), reduction="mean")
    return F.binary_cross_entropy(d, label, reduction="mean")


def load_ref_into(tlkd_disc: nn.Module, ref: nn.Sequential) -> None:
    """tlkd's discriminator gets the reference's weights, its last layer negated: tlkd's
    logit is for target (label 1), tllib's sigmoid gives P(source)."""
    state = dict(zip(tlkd_disc.state_dict(), ref.state_dict().values(), strict=True))
    last = [k for k in state if k.endswith(("weight", "bias"))][-2:]
    for k in last:
        state[k] = -state[k]
    tlkd_disc.load_state_dict(state)


def assert_discriminator_grads(mine: nn.Module, ref: nn.Sequential) -> None:
    """Equal gradients, the last layer's negated (``load_ref_into``). A Linear bias followed
    by BatchNorm has gradient zero (BatchNorm subtracts the mean): both only rounding."""
    pairs = list(zip(mine.named_parameters(), ref.parameters(), strict=True))
    for i, ((name, p), q) in enumerate(pairs):
        if name in ("net.0.bias", "net.3.bias"):
            assert p.grad.abs().max() < 1e-5 and q.grad.abs().max() < 1e-5, name
            continue
        sign = -1.0 if i >= len(pairs) - 2 else 1.0
        torch.testing.assert_close(p.grad, sign * q.grad, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """A timm-like model: features (8), then a classifier (3) found by get_classifier()."""

    num_classes, num_features = 3, 8

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _batch():
    """Source and target rows interleaved (tlkd's objective must not care about order); the
    reference gets them source first, as tllib concatenates them."""
    torch.manual_seed(0)
    xs, xt = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2) + 1.0
    ys = torch.tensor([0, 2, 1, 1, 0])
    order = torch.tensor([0, 5, 1, 6, 7, 2, 3, 8, 9, 4])
    images = torch.cat([xs, xt])[order]
    targets = torch.cat([ys, torch.full((5,), -1)])[order]
    return xs, xt, ys, images, targets


LOGITS = torch.tensor(
    [
        [2.0, -1.0, 0.5, 0.0, 1.5],
        [0.1, 0.2, 0.3, -0.4, 0.0],
        [-3.0, 4.0, 1.0, 0.5, -1.0],
        [1.0, 1.0, 1.0, 1.0, 1.0],
        [0.0, -2.0, 5.0, 1.0, 2.0],
        [2.5, 2.4, -1.0, 0.0, 0.3],
        [-0.7, 0.9, 0.1, 3.0, -2.2],
    ]
)


# --- MCC -----------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_mcc_parity_value_and_logit_gradient(temperature):
    a, b = LOGITS.clone().requires_grad_(), LOGITS.clone().requires_grad_()
    mine, ref = mcc_loss(a, temperature), ref_mcc(b, temperature)
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-7)
    mine.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert a.grad.abs().sum() > 0
    # confident, distinct predictions have (almost) no confusion; uniform ones the most
    sharp = 50 * torch.eye(5)
    assert mcc_loss(sharp, temperature) < 1e-6
    uniform = mcc_loss(torch.zeros(7, 5), temperature)
    torch.testing.assert_close(uniform, torch.tensor(4 / 5))


def test_mcc_parity_training_step():
    """The MCC step (loss, logged term, every model gradient) against tllib's MCC example:
    cross-entropy on the source + trade-off x MinimumClassConfusionLoss(target logits)."""
    xs, xt, ys, images, targets = _batch()
    model = Tiny().train()
    ref_model = copy.deepcopy(model)
    cfg = AdaptConfig(method="mcc", weight=0.7)
    assert cfg.temperature == 2.5 and cfg.warmup_epochs == 0 and cfg.target_bn is False
    obj = MCC(cfg, None, {}, None, model)
    obj.start_epoch(1, 2)
    obj.start_step(1, 3)
    out = obj(model, images, targets)
    out.loss.backward()

    y = ref_model(torch.cat([xs, xt]))
    y_s, y_t = y.chunk(2, dim=0)
    transfer = ref_mcc(y_t, 2.5)
    ref_loss = F.cross_entropy(y_s, ys) + 0.7 * transfer
    ref_loss.backward()
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.parts["mcc"], transfer.detach(), rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    # during warm-up epochs the source alone
    warm = MCC(AdaptConfig(method="mcc", warmup_epochs=1), None, {}, None, model)
    warm.start_epoch(1, 2)
    warm.start_step(1, 3)
    assert set(warm(model, images, targets).parts) == {"ce"}


# --- CDAN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("randomized", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_cdan_parity_loss_and_gradients(entropy, randomized):
    """cdan_loss on fixed features and logits: the value, the gradient on the features (the
    reversal's sign: -lambda x the plain gradient), none on the logits (tllib detaches the
    softmax), and the discriminator's gradients; CDAN+E and the randomized map (the same
    random matrices) included."""
    torch.manual_seed(1)
    n, feats_dim, classes, hidden, lam = 6, 5, 3, 16, 0.37
    f = torch.randn(n, feats_dim)
    g = torch.randn(n, classes) * 2
    tgt = torch.tensor([False, True, False, True, True, False])
    from tlkd.adapt.grl import DomainDiscriminator

    if randomized:
        mapping = RandomizedMultilinearMap(feats_dim, classes, 7)
        width = 7

        def ref_map(f_, g_):
            return ref_randomized(mapping.rf.clone(), mapping.rg.clone(), f_, g_)
    else:
        mapping, width, ref_map = MultilinearMap(), feats_dim * classes, ref_multilinear
    ref_disc = ref_discriminator(width, hidden).train()
    disc = DomainDiscriminator(width, hidden, batch_norm=True).train()
    load_ref_into(disc, ref_disc)

    fa, ga = f.clone().requires_grad_(), g.clone().requires_grad_()
    mine = cdan_loss(disc, mapping, fa, ga, tgt, lam, entropy)
    mine.backward()
    src = ~tgt
    fb = f.clone().requires_grad_()
    ref = ref_cdan(
        ref_disc, lambda x: RefReverse.apply(x, lam), ref_map, entropy,
        g[src], fb[src], g[tgt], fb[tgt],
    )  # fmt: skip
    ref.backward()
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fa.grad, fb.grad, rtol=1e-5, atol=1e-7)
    assert ga.grad is None or not ga.grad.any()
    assert_discriminator_grads(disc, ref_disc)
    # without the reversal the features' gradient is the same times -1 / lambda
    fc = f.clone().requires_grad_()
    plain = ref_cdan(
        ref_disc, lambda x: x, ref_map, entropy, g[src], fc[src], g[tgt], fc[tgt],
    )  # fmt: skip
    plain.backward()
    torch.testing.assert_close(fa.grad, -lam * fc.grad, rtol=1e-5, atol=1e-7)
    assert fa.grad.abs().sum() > 0


@pytest.mark.parametrize("randomized", [False, True])
def test_cdan_parity_training_step(randomized):
    """The CDAN+E step (loss, logged term, every model and discriminator gradient) against
    tllib's CDAN example: cross-entropy on the source + trade-off x
    ConditionalDomainAdversarialLoss(y_s, f_s, y_t, f_t) with its warm-start reversal at
    the same iteration."""
    xs, xt, ys, images, targets = _batch()
    model = Tiny().train()
    ref_model = copy.deepcopy(model)
    cfg = AdaptConfig(
        method="cdan", entropy=True, hidden=16, weight=0.7, randomized=randomized,
        randomized_dim=9,
    )  # fmt: skip
    obj = CDAN(cfg, None, {}, None, model).train()
    width = 9 if randomized else 8 * 3
    assert isinstance(obj.mapping, RandomizedMultilinearMap if randomized else MultilinearMap)
    ref_disc = ref_discriminator(width, 16).train()
    load_ref_into(obj.discriminator, ref_disc)
    epochs, steps, epoch, step = 30, 50, 23, 7  # past tllib's 1000 iterations: no cap
    obj.start_epoch(epoch, epochs)
    obj.start_step(step, steps)
    out = obj(model, images, targets)
    out.loss.backward()

    grl = RefWarmStartGRL(alpha=1.0, lo=0.0, hi=1.0, max_iters=1000, auto_step=True)
    grl.iter_num = (epoch - 1) * steps + step - 1
    if randomized:

        def mapping(f_, g_):
            return ref_randomized(obj.mapping.rf, obj.mapping.rg, f_, g_)
    else:
        mapping = ref_multilinear
    f = ref_model.body(torch.cat([xs, xt]))
    y = ref_model.fc(f)
    (y_s, y_t), (f_s, f_t) = y.chunk(2, dim=0), f.chunk(2, dim=0)
    transfer = ref_cdan(ref_disc, grl, mapping, True, y_s, f_s, y_t, f_t)
    ref_loss = F.cross_entropy(y_s, ys) + 0.7 * transfer
    ref_loss.backward()
    assert grl.coeff == pytest.approx(2 / (1 + math.exp(-1106 / 1000)) - 1, abs=1e-15)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.parts["domain"], transfer.detach(), rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert_discriminator_grads(obj.discriminator, ref_disc)
    # the random matrices are checkpointed (buffers), so a resumed run keeps them
    assert ("mapping.rf" in obj.state_dict()) == randomized


@pytest.mark.parametrize("warmup", [0, 2])
def test_cdan_parity_grl_schedule(warmup):
    """lambda per adapting step is tllib's WarmStartGradientReverseLayer as its CDAN loss
    builds it (alpha 1, lo 0, hi 1, max_iters 1000, auto_step): the count starts at 0 at
    the first step after the warm-up epochs and grows by one per step, with no cap."""
    from tlkd.adapt.cdan import GRL_ALPHA, GRL_MAX_ITERS
    from tlkd.adapt.grl import dann_lambda

    epochs, steps = 6, 400
    ref = RefWarmStartGRL(alpha=1.0, lo=0.0, hi=1.0, max_iters=1000, auto_step=True)
    obj = CDAN(AdaptConfig(method="cdan", warmup_epochs=warmup), None, {}, None, Tiny(), 8)
    ours, theirs = [], []
    for epoch in range(1, epochs + 1):
        obj.start_epoch(epoch, epochs)
        for step in range(1, steps + 1):
            obj.start_step(step, steps)
            if obj.adapting:
                ours.append(dann_lambda(obj.progress[0], GRL_MAX_ITERS, GRL_ALPHA))
                ref(torch.zeros(1))
                theirs.append(ref.coeff)
    assert len(ours) == (epochs - warmup) * steps and ours[0] == 0.0
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["dann", "cdan"])
def test_warmup_gives_every_discriminator_parameter_a_zero_gradient(method):
    """During warm-up epochs the discriminator runs with lambda 0 and counts 0 times, so
    DistributedDataParallel (no find_unused_parameters) sees every parameter get a gradient;
    the loss, its logged parts and the model's gradients are the plain source cross-entropy's,
    bit for bit, and before_update drops the discriminator's zero gradients so the optimizer
    skips it (no weight decay) as before. After the warm-up it trains."""
    from tlkd.adapt.objectives import DANN

    xs, xt, ys, images, targets = _batch()
    model = Tiny().train()
    ref_model = copy.deepcopy(model)
    cls = {"dann": DANN, "cdan": CDAN}[method]
    obj = cls(AdaptConfig(method=method, warmup_epochs=1, hidden=16), None, {}, None, model)
    obj.start_epoch(1, 2)
    obj.start_step(2, 3)
    assert not obj.adapting
    out = obj(model, images, targets)
    plain = F.cross_entropy(ref_model(images)[targets >= 0], targets[targets >= 0])
    assert torch.equal(out.loss, plain) and set(out.parts) == {"ce"}
    assert torch.equal(out.parts["ce"], plain)
    out.loss.backward()
    plain.backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    disc = dict(obj.discriminator.named_parameters())
    assert disc and all(p.grad is not None and not p.grad.any() for p in disc.values())
    obj.before_update(model)
    assert all(p.grad is None for p in disc.values())
    model.zero_grad()
    obj.start_epoch(2, 2)  # adapting: the domain term, and gradients the optimizer keeps
    out = obj(model, images, targets)
    assert set(out.parts) == {"ce", "domain"} and out.loss > out.parts["ce"]
    out.loss.backward()
    obj.before_update(model)
    assert all(p.grad is not None for p in disc.values())
    assert any(p.grad.any() for p in disc.values())


def test_mcc_and_cdan_randomized_map_in_float32_under_bf16_autocast():
    """Under bf16 autocast (here on the CPU) the confusion matrix and the randomized map's
    products stay float32: the values are the float32 ones."""
    torch.manual_seed(3)
    logits = torch.randn(16, 5) * 3
    want = mcc_loss(logits, 2.5)
    mapping = RandomizedMultilinearMap(12, 5, 64)
    f, g = torch.randn(16, 12), torch.softmax(torch.randn(16, 5), dim=1)
    want_map = mapping(f, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_map = mcc_loss(logits, 2.5), mapping(f, g)
    assert got.dtype == got_map.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_map, want_map, rtol=1e-6, atol=1e-6)


def test_objective_parameter_groups_follow_timms_no_weight_decay_rule():
    """The optimizer's groups for an objective's own parameters (a discriminator, projector
    or predictor) follow timm's rule for the model's: tensors of at most one dimension
    (biases, BatchNorm scales and shifts) get no weight decay; a group's own keys stay (the
    fixed-lr predictor); without weight decay, the groups as they are."""
    from tlkd.config.loader import load_config
    from tlkd.config.schema import PretrainConfig
    from tlkd.engine.optim import build_optimizer
    from tlkd.ssl.simsiam import SimSiam

    def optimizer(model, objective, wd):
        opt = ["train.optimizer.name=sgd", "train.optimizer.lr=0.1"]
        cfg = load_config(None, [*opt, f"train.optimizer.weight_decay={wd}"])
        return build_optimizer(cfg, model, objective)

    model = Tiny()
    cdan = CDAN(AdaptConfig(method="cdan", hidden=16), None, {}, None, model)  # BatchNorm
    simsiam = SimSiam(8, PretrainConfig(method="simsiam", proj_hidden=16, proj_dim=16,
                                        fix_pred_lr=True))  # fmt: skip
    for objective in (cdan, simsiam):
        opt = optimizer(model, objective, 0.05)
        wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        params = [*model.named_parameters(), *objective.named_parameters()]
        assert len(wd) == len(params)
        for name, p in params:
            assert wd[id(p)] == (0.0 if p.ndim <= 1 else 0.05), name
        assert any(p.ndim <= 1 for _, p in objective.named_parameters())
        fixed = {id(p) for g in opt.param_groups if g.get("fixed_lr") for p in g["params"]}
        want = {id(p) for p in simsiam.predictor.parameters()} if objective is simsiam else set()
        assert fixed == want
        no_decay = optimizer(model, objective, 0.0)
        assert len(no_decay.param_groups) == 1 + len(objective.param_groups())


def test_cdan_randomized_auto_follows_the_papers_threshold():
    """auto: the full multilinear map up to 4096 inputs (features x classes), the randomized
    one (randomized_dim) above; the discriminator is tllib's example's, 1024 hidden units."""
    cfg = AdaptConfig(method="cdan")
    assert cfg.randomized == "auto" and cfg.hidden == 1024 and cfg.entropy is False
    small = CDAN(cfg, None, {}, None, Tiny(), 64)  # 64 x 3 = 192: full
    assert isinstance(small.mapping, MultilinearMap)
    assert small.discriminator.net[0].in_features == 192
    assert small.discriminator.net[0].out_features == 1024
    big = CDAN(cfg, None, {}, None, Tiny(), 2048)  # 6144 > 4096: randomized
    assert isinstance(big.mapping, RandomizedMultilinearMap)
    assert big.discriminator.net[0].in_features == 1024
    forced = CDAN(AdaptConfig(method="cdan", randomized=False), None, {}, None, Tiny(), 2048)
    assert forced.discriminator.net[0].in_features == 6144


# --- end to end ----------------------------------------------------------------------------


@pytest.fixture
def domains(tmp_path):
    """Source: clean squares; target: darker and noisier ones (unlabelled: one flat folder)."""
    source = write_images(tmp_path / "source", per_class=8, seed=1)
    target_tmp = write_images(tmp_path / "target_tmp", per_class=8, seed=3, noise=60)
    flat = tmp_path / "target"
    flat.mkdir()
    for i, f in enumerate(sorted(target_tmp.rglob("*.png"))):
        f.rename(flat / f"{i:03d}.png")
    target_val = write_images(tmp_path / "target_val", per_class=4, seed=4, noise=60)
    return source, flat, target_val


ADAPT = {
    "mcc": ({"method": "mcc"}, "train_loss_mcc", "mcc         class confusion"),
    "cdan": (
        {"method": "cdan", "entropy": True, "hidden": 16, "randomized": True, "randomized_dim": 32},
        "train_loss_domain",
        "cdan        CDAN+E",
    ),
}
LEARNED = ("train_loss", "train_top1", "val_loss", "val_top1", "lr")


@pytest.mark.parametrize("method", ["mcc", "cdan"])
def test_adapt_runs_and_resumes_exactly(
    tmp_path, domains, write_config, run_cli, method, monkeypatch
):
    """From YAML: the plan line, a finished run logging the method's term, a run of one
    epoch resumed to two, and a run stopped inside its second epoch (SIGTERM's path) and
    resumed, each ending exactly as the uninterrupted two-epoch run."""
    source, target, target_val = domains
    adapt, term, plan = ADAPT[method]
    cfg = small_config(tmp_path, source, target_val, train={"epochs": 2})
    cfg["data"]["unlabeled"] = str(target)
    cfg["adapt"] = adapt
    config = write_config(cfg)
    proc = run_cli("adapt", config, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert plan in proc.stdout
    assert ("grl         tllib's warm start" in proc.stdout) == (method == "cdan")
    proc = run_cli("adapt", config, "experiment=full")
    assert proc.returncode == 0, proc.stderr
    full = tmp_path / "runs" / "full"
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1][term] > 0 and rows[-1]["val_top1"] is not None
    summary = json.loads((full / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["adapt"] == method
    saved = load_file(full / "model.safetensors")
    assert not any("discriminator" in k or "mapping" in k for k in saved)

    proc = run_cli("adapt", config, "experiment=part", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr
    part = tmp_path / "runs" / "part"
    proc = run_cli("adapt", "--resume", part, "train.epochs=2")
    assert proc.returncode == 0, proc.stderr
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in (*LEARNED, term)} for r in resumed] == [
        {k: r[k] for k in (*LEARNED, term)} for r in rows
    ]
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # stopped inside epoch 2 (24 images, batch 8: 3 updates per epoch), then resumed
    mid = interrupted_and_resumed(
        run_cli, monkeypatch, "adapt", config, 4, tmp_path / "runs" / "mid"
    )
    resumed = [json.loads(x) for x in (mid / "metrics.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in (*LEARNED, term)} for r in resumed] == [
        {k: r[k] for k in (*LEARNED, term)} for r in rows
    ]
    c = load_file(mid / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
