"""tlkd adapt against the reference code: DANN's gradient reversal, its lambda schedule and
domain loss, plain DANN's shared BatchNorm, and the source val set scored with the source's
BatchNorm statistics. Each reference is transcribed here, independently of tlkd's code."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tlkd.adapt.grl import dann_lambda, reverse_gradient
from tlkd.adapt.objectives import DANN, AdaBN
from tlkd.config.schema import AdaptConfig
from tlkd.engine.inference import classification_metrics, predict

# --- transcription of thuml/Transfer-Learning-Library, tllib/modules/grl.py ---------------


class RefGradientReverseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, coeff=1.0):
        ctx.coeff = coeff
        return input * 1.0

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output.neg() * ctx.coeff, None


class RefWarmStartGradientReverseLayer(nn.Module):
    def __init__(self, alpha=1.0, lo=0.0, hi=1.0, max_iters=1000.0, auto_step=False):
        super().__init__()
        self.alpha, self.lo, self.hi = alpha, lo, hi
        self.iter_num, self.max_iters, self.auto_step = 0, max_iters, auto_step
        self.coeff = None  # recorded here for the test

    def forward(self, input):
        coeff = float(
            2.0 * (self.hi - self.lo) / (1.0 + np.exp(-self.alpha * self.iter_num / self.max_iters))
            - (self.hi - self.lo)
            + self.lo
        )
        self.coeff = coeff
        if self.auto_step:
            self.step()
        return RefGradientReverseFunction.apply(input, coeff)

    def step(self):
        self.iter_num += 1


# --- transcription of tllib/alignment/dann.py, DomainAdversarialLoss (reduction "mean") ----


def ref_domain_adversarial_loss(discriminator, grl, f_s, f_t):
    """``discriminator`` gives P(source) (tllib's ends in a sigmoid; source label 1)."""
    f = grl(torch.cat((f_s, f_t), dim=0))
    d = discriminator(f)
    d_s, d_t = d.chunk(2, dim=0)
    d_label_s = torch.ones((f_s.size(0), 1))
    d_label_t = torch.zeros((f_t.size(0), 1))
    w_s, w_t = torch.ones_like(d_label_s), torch.ones_like(d_label_t)
    return 0.5 * (
        F.binary_cross_entropy(d_s, d_label_s, weight=w_s.view_as(d_s))
        + F.binary_cross_entropy(d_t, d_label_t, weight=w_t.view_as(d_t))
    )


# ------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """A timm-like model: features, then a classifier found by get_classifier()."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_gradient_reversal_parity_with_tllib():
    """tllib/modules/grl.py (thuml/Transfer-Learning-Library), GradientReverseFunction."""
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    w = torch.randn(6, 5)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = reverse_gradient(a, 0.37), RefGradientReverseFunction.apply(b, 0.37)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("warmup", [0, 2])
def test_dann_lambda_schedule_parity_with_tllib(warmup):
    """Ganin's lambda per iteration, p from 0 to 1 over the steps after the warm-up epochs:
    tllib/modules/grl.py (thuml/Transfer-Learning-Library), WarmStartGradientReverseLayer with
    lo 0, hi 1, alpha = Ganin's gamma 10, max_iters the adapting steps, auto_step (the count
    starts at 0 and grows by one per forward), which is 2 / (1 + exp(-10 p)) - 1."""
    epochs, steps = 6, 7
    total = (epochs - warmup) * steps
    ref = RefWarmStartGradientReverseLayer(alpha=10.0, lo=0.0, hi=1.0, max_iters=total)
    ref.auto_step = True
    obj = DANN(AdaptConfig(method="dann", warmup_epochs=warmup), None, {}, None, Tiny(), 8)
    ours, theirs = [], []
    for epoch in range(1, epochs + 1):
        obj.start_epoch(epoch, epochs)
        for step in range(1, steps + 1):
            obj.start_step(step, steps)
            if obj.adapting:
                ours.append(dann_lambda(*obj.progress))
                ref(torch.zeros(1))
                theirs.append(ref.coeff)
    assert len(ours) == total
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)
    # it rises within the first adapting epoch from 0, below the constant the old per-epoch
    # schedule used for that whole epoch (2 / (1 + exp(-10 / epochs)) - 1)
    per_epoch = 2 / (1 + math.exp(-10 / (epochs - warmup))) - 1
    assert ours[0] == 0.0 and max(ours[:steps]) < per_epoch
    p = np.arange(total) / total
    np.testing.assert_allclose(ours, 2 / (1 + np.exp(-10 * p)) - 1, rtol=1e-12, atol=1e-15)
    # the count is a position (epoch, step): a fresh objective told where it is agrees
    fresh = DANN(AdaptConfig(method="dann", warmup_epochs=warmup), None, {}, None, Tiny(), 8)
    fresh.start_epoch(epochs, epochs)
    fresh.start_step(3, steps)
    assert fresh.progress == (total - steps + 2, total)


def test_dann_loss_and_gradient_parity_with_tllib():
    """The DANN step's loss and every gradient (model and discriminator) against
    tllib/alignment/dann.py's DomainAdversarialLoss with tllib/modules/grl.py's
    WarmStartGradientReverseLayer (thuml/Transfer-Learning-Library), loss = classification
    cross-entropy on the source + trade-off x transfer loss, as tllib's DANN example trains.
    tlkd labels the source 0 (Ganin's paper), tllib 1: the same discriminator network gives
    tllib's P(source) as sigmoid(-logit)."""
    torch.manual_seed(0)
    model = Tiny().train()
    cfg = AdaptConfig(method="dann", hidden=16, weight=0.7)
    obj = DANN(cfg, None, {}, None, model, 8).train()
    xs, xt = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2) + 1.0
    ys = torch.tensor([0, 2, 1, 1, 0])
    images, targets = torch.cat([xs, xt]), torch.cat([ys, torch.full((5,), -1)])
    ref_model, ref_disc = copy.deepcopy(model), copy.deepcopy(obj.discriminator)
    epochs, steps, epoch, step = 3, 4, 2, 3
    obj.start_epoch(epoch, epochs)
    obj.start_step(step, steps)
    out = obj(model, images, targets)
    out.loss.backward()

    iters = (epoch - 1) * steps + (step - 1)
    grl = RefWarmStartGradientReverseLayer(alpha=10.0, max_iters=epochs * steps, auto_step=True)
    grl.iter_num = iters
    f_s, f_t = ref_model.body(xs), ref_model.body(xt)
    y_s = ref_model.fc(f_s)
    cls_loss = F.cross_entropy(y_s, ys)
    transfer = ref_domain_adversarial_loss(lambda f: torch.sigmoid(-ref_disc.net(f)), grl, f_s, f_t)
    ref_loss = cls_loss + cfg.weight * transfer
    ref_loss.backward()

    assert grl.coeff == pytest.approx(2 / (1 + math.exp(-10 * iters / 12)) - 1, abs=1e-15)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.parts["domain"], transfer.detach(), rtol=1e-6, atol=1e-6)
    for mine, ref in [(model, ref_model), (obj.discriminator, ref_disc)]:
        for (name, p), q in zip(mine.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_plain_dann_is_the_default_and_shares_batchnorm():
    """adapt.method: dann alone is Ganin's DANN (as tllib trains it): source and target in one
    batch through the shared BatchNorm; target_bn: true is the per-domain variant."""
    torch.manual_seed(0)
    assert AdaptConfig(method="dann").target_bn is False
    assert AdaptConfig(method="pseudo_label").target_bn is False
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 3))
    model.get_classifier = lambda: model[3]
    images = torch.cat([torch.randn(4, 3, 2, 2), 5 + 3 * torch.randn(4, 3, 2, 2)])
    targets = torch.tensor([0, 1, 2, 0, -1, -1, -1, -1])
    plain = DANN(AdaptConfig(method="dann"), None, {}, None, model, 16)
    plain.start_epoch(1, 2)
    plain.start_step(1, 1)
    logits = plain(model, images, targets).logits
    assert len(plain._feats) == 1  # one forward pass: one batch, one set of statistics
    torch.testing.assert_close(logits, model(images))
    per_domain = DANN(AdaptConfig(method="dann", target_bn=True), None, {}, None, model, 16)
    per_domain.start_epoch(1, 2)
    per_domain.start_step(1, 1)
    logits = per_domain(model, images, targets).logits
    torch.testing.assert_close(logits[4:], model(images[4:]))
    assert not torch.allclose(logits, model(images), atol=1e-3)


def test_source_val_is_scored_with_the_source_batchnorm_statistics():
    """source_val_top1/loss equal a source-only evaluation of the same weights (the running
    statistics training left), though the target's are re-estimated for the target val set
    and the saved model."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 3),
    )  # fmt: skip
    model.train()
    for _ in range(5):  # running statistics of the source
        model(torch.randn(8, 3, 4, 4))
    source_val = [(torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    target = [(4 + 3 * torch.randn(8, 3, 4, 4), torch.full((8,), -1)) for _ in range(3)]
    cpu = torch.device("cpu")
    expected = classification_metrics(*predict(copy.deepcopy(model), source_val, cpu))
    runtime = {"device": cpu, "dtype": None, "channels_last": False}
    obj = AdaBN(AdaptConfig(method="adabn"), source_val, runtime, target)
    bn = model[1]
    before = bn.running_mean.clone()
    obj.before_val(model)
    assert not torch.allclose(bn.running_mean, before)  # the target's now
    scores = obj.extra_val(model)
    assert scores == {"source_val_loss": expected["loss"], "source_val_top1": expected["top1"]}
    after = classification_metrics(*predict(model, source_val, cpu))
    assert after["loss"] != expected["loss"]  # what the old order reported instead
