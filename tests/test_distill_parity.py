"""Parity with the papers' official code: tlkd's loss values and their gradients (w.r.t. the
student's inputs) against transcriptions of the reference implementations, written here, on
fixed random tensors. Each test names the repository and file it transcribes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tlkd.config.schema import LossConfig
from tlkd.distill import losses as L
from tlkd.distill.losses.fitnet import ConvReg
from tlkd.errors import ConfigError


def _grad(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def _leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# --- attention transfer ---------------------------------------------------------------------


class _RefAttention(nn.Module):
    """Transcribed from HobbitLong/RepDistiller distiller_zoo/AT.py (class Attention)."""

    def __init__(self, p=2):
        super().__init__()
        self.p = p

    def forward(self, g_s, g_t):
        return [self.at_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t, strict=True)]

    def at_loss(self, f_s, f_t):
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        return (self.at(f_s) - self.at(f_t)).pow(2).mean()

    def at(self, f):
        return F.normalize(f.pow(self.p).mean(1).view(f.size(0), -1))


@pytest.mark.parametrize(
    "sizes",
    [
        [(16, 16, 32, 16), (32, 8, 64, 8), (64, 4, 128, 4)],  # same spatial sizes, 3 stages
        [(16, 16, 32, 8), (32, 4, 64, 8)],  # larger student map, then larger teacher map
    ],
)
def test_at_parity_with_repdistiller(sizes):
    """HobbitLong/RepDistiller distiller_zoo/AT.py, summed over the stages as helper/loops.py
    does (``loss_kd = sum(loss_group)`` over ``feat[1:-1]``, weight ``-b 1000``)."""
    torch.manual_seed(0)
    student = [torch.randn(4, cs, hs, hs) for cs, hs, _, _ in sizes]
    teacher = [torch.randn(4, ct, ht, ht) for _, _, ct, ht in sizes]
    ours_in, ref_in = _leaves(student), _leaves(student)
    ours = L.at_loss(ours_in, teacher, p=2.0)
    ref = sum(_RefAttention(p=2)(ref_in, teacher))
    torch.testing.assert_close(ours, ref)
    for a, b in zip(_grad(ours, ours_in), _grad(ref, ref_in), strict=True):
        torch.testing.assert_close(a, b)
    assert LossConfig(type="at").p == 2.0


# --- FitNet ---------------------------------------------------------------------------------


class _RefConvReg(nn.Module):
    """Transcribed from HobbitLong/RepDistiller models/util.py (class ConvReg)."""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        self.use_relu = use_relu
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise NotImplementedError(f"student size {s_h}, teacher size {t_h}")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        if self.use_relu:
            return self.relu(self.bn(x))
        return self.bn(x)


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "conv"),
    [
        ((4, 16, 8, 8), (4, 32, 8, 8), nn.Conv2d),  # same size: 1x1 conv (kernel 1 + s - t)
        ((4, 16, 16, 16), (4, 32, 8, 8), nn.Conv2d),  # 2x larger: strided 3x3 conv
        ((4, 16, 4, 4), (4, 32, 8, 8), nn.ConvTranspose2d),  # 2x smaller: transposed conv
        ((4, 16, 7, 7), (4, 32, 5, 5), nn.Conv2d),  # larger by 2: a 3x3 valid conv
    ],
)
def test_fitnet_parity_with_repdistiller(s_shape, t_shape, conv):
    """HobbitLong/RepDistiller models/util.py ConvReg (conv, BN, ReLU) with
    distiller_zoo/FitNet.py HintLoss (``nn.MSELoss()``) on one hint layer, train mode."""
    torch.manual_seed(0)
    ours_reg, ref_reg = ConvReg(s_shape, t_shape), _RefConvReg(s_shape, t_shape)
    assert type(ours_reg.conv) is conv
    ref_reg.load_state_dict(ours_reg.state_dict())  # the same parameters, the same names
    feat_s, feat_t = torch.randn(s_shape), torch.randn(t_shape).relu()
    (ours_in,), (ref_in,) = _leaves([feat_s]), _leaves([feat_s])
    ours = L.fitnet_loss([ours_reg(ours_in)], [feat_t])
    ref = nn.MSELoss()(ref_reg(ref_in), feat_t)
    torch.testing.assert_close(ours, ref)
    # the gradients w.r.t. the student's features and the regressor's own parameters agree
    ours_g = _grad(ours, [ours_in, *ours_reg.parameters()])
    ref_g = _grad(ref, [ref_in, *ref_reg.parameters()])
    for a, b in zip(ours_g, ref_g, strict=True):
        torch.testing.assert_close(a, b)


def test_fitnet_regressor_refuses_what_the_reference_cannot_map():
    with pytest.raises(ConfigError, match="smaller than the teacher's"):
        ConvReg((2, 8, 3, 3), (2, 8, 8, 8), "distill.losses.0")


# --- DKD ------------------------------------------------------------------------------------


def _ref_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    """Transcribed from megvii-research/mdistiller mdistiller/distillers/DKD.py (dkd_loss,
    _get_gt_mask, _get_other_mask, cat_mask; ``size_average=False`` is ``reduction="sum"``)."""
    target = target.reshape(-1)
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = (
        F.kl_div(log_pred_student, pred_teacher, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_parity_with_mdistiller(dtype, alpha, beta, temperature):
    """megvii-research/mdistiller mdistiller/distillers/DKD.py dkd_loss: value and gradient."""
    torch.manual_seed(0)
    student = torch.randn(16, 10, dtype=dtype) * 3
    teacher = torch.randn(16, 10, dtype=dtype) * 3
    target = torch.randint(0, 10, (16,))
    (ours_in,), (ref_in,) = _leaves([student]), _leaves([student])
    ours = L.dkd_loss(ours_in, teacher, target, alpha, beta, temperature)
    ref = _ref_dkd_loss(ref_in, teacher, target, alpha, beta, temperature)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grad(ours, [ours_in])[0], _grad(ref, [ref_in])[0])


def test_dkd_parity_at_a_large_margin():
    """megvii-research/mdistiller mdistiller/distillers/DKD.py, reference in float64: at T=1
    and a target margin of 30 the target-logit gradient is about 0.24 (p_s - p_t of the
    target), not the 0 a clamp of p(not target) gave."""
    torch.manual_seed(0)
    student = torch.randn(8, 10)
    target = torch.randint(0, 10, (8,))
    student[torch.arange(8), target] += 30.0
    teacher = torch.randn(8, 10)
    teacher[torch.arange(8), target] += 2.0
    (ours_in,) = _leaves([student])
    (ref_in,) = _leaves([student.double()])
    ours = L.dkd_loss(ours_in, teacher, target, 1.0, 8.0, 1.0)
    ref = _ref_dkd_loss(ref_in, teacher.double(), target, 1.0, 8.0, 1.0)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-5)
    ours_g, ref_g = _grad(ours, [ours_in])[0], _grad(ref, [ref_in])[0]
    torch.testing.assert_close(ours_g.double(), ref_g, rtol=1e-3, atol=1e-6)
    rows = torch.arange(8)
    p_t = F.softmax(teacher, dim=1)[rows, target]
    expected = (1 - p_t) / 8  # batchmean: per row p_s(target) - p_t(target), p_s ~ 1
    torch.testing.assert_close(ours_g[rows, target], expected, rtol=1e-3, atol=1e-6)
    assert (ours_g[rows, target] > 0.01).all()

    # one row, the brief's numbers: p_t(target) = 0.76 -> gradient 0.24
    one = torch.tensor([[30.0, 0.0, 0.0]], requires_grad=True)
    t_one = torch.tensor([[0.0, 0.0, 0.0]])
    t_one[0, 1:] = torch.log(torch.tensor(0.12 / 0.76))
    loss = L.dkd_loss(one, t_one, torch.tensor([0]), 1.0, 8.0, 1.0)
    assert _grad(loss, [one])[0][0, 0].item() == pytest.approx(0.24, abs=1e-3)


def test_dkd_warmup_parity_with_mdistiller():
    """megvii-research/mdistiller mdistiller/distillers/DKD.py forward_train:
    ``min(kwargs["epoch"] / self.warmup, 1.0) * dkd_loss(...)`` with epochs counted from 1
    (mdistiller/engine/trainer.py: ``epoch = 1; while epoch < EPOCHS + 1``), WARMUP 20."""
    import timm

    import tlkd  # noqa: F401  registers the CIFAR models
    from tlkd.distill.objective import Distillation
    from tlkd.distill.teacher import Teacher

    torch.manual_seed(0)
    stats = ((0.5,) * 3, (0.25,) * 3)
    teacher = Teacher(timm.create_model("resnet20", num_classes=10), None, "t", False, *stats)
    student = timm.create_model("resnet20", num_classes=10).eval()
    loss = LossConfig(type="dkd")
    assert loss.warmup_epochs == 20
    classes = [str(i) for i in range(10)]
    objective = Distillation(
        student, [teacher], [loss], classes, None, [1.0], 16, torch.device("cpu")
    )
    images, targets = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with torch.no_grad():
        s_logits, (t_logits, _) = student(images), teacher(images)
    full = _ref_dkd_loss(s_logits, t_logits, targets, 1.0, 8.0, 4.0)
    for epoch in (1, 5, 20, 30):
        objective.start_epoch(epoch, 30)
        with torch.no_grad():
            got = objective(student, images, targets).parts["dkd"]
        torch.testing.assert_close(got, min(epoch / 20, 1.0) * full, rtol=1e-5, atol=1e-6)
    off = Distillation(
        student, [teacher], [LossConfig(type="dkd", warmup_epochs=0)], classes, None, [1.0], 16,
        torch.device("cpu"),
    )  # fmt: skip
    off.start_epoch(1, 30)
    with torch.no_grad():
        torch.testing.assert_close(
            off(student, images, targets).parts["dkd"], full, rtol=1e-5, atol=1e-6
        )
