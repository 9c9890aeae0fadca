"""Logit standardization (Sun et al., CVPR 2024, "Logit Standardization in Knowledge
Distillation") on kd, dkd and dist: values and gradients (w.r.t. the student's logits) against
an independent transcription of the official code, sunshangquan/logit-standardization-KD
(built on mdistiller), on fixed random tensors; the composition with several teachers; and
the ``standardize`` key in the config."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import tlkd.models  # noqa: F401  registers the CIFAR models
from tlkd.config.loader import validate
from tlkd.config.schema import LossConfig
from tlkd.distill import losses as L
from tlkd.distill.losses.kd import standardize_logits
from tlkd.distill.objective import Distillation
from tlkd.distill.teacher import Teacher
from tlkd.errors import ConfigError

DTYPES = [torch.float32, torch.float64]


def _ref_normalize(logit):
    """Transcribed from sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py
    (``normalize``; DKD.py has the same): ``Tensor.std``'s default is the unbiased std."""
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def _ref_kd_loss(logits_student_in, logits_teacher_in, temperature, logit_stand):
    """Transcribed from sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py
    (``kd_loss``)."""
    logits_student = _ref_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = _ref_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss_kd * temperature**2


def _ref_dkd_loss(logits_student_in, logits_teacher_in, target, alpha, beta, temperature, ls):
    """Transcribed from sunshangquan/logit-standardization-KD mdistiller/distillers/DKD.py
    (``dkd_loss``, ``_get_gt_mask``, ``_get_other_mask``, ``cat_mask``; its
    ``size_average=False`` is ``reduction="sum"``)."""
    logits_student = _ref_normalize(logits_student_in) if ls else logits_student_in
    logits_teacher = _ref_normalize(logits_teacher_in) if ls else logits_teacher_in
    target = target.reshape(-1)
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    tckd_loss = (
        F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum")
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


def _def_dist_loss(student, teacher, beta, gamma, temperature, z_scored=True):
    """DIST (Huang et al. 2022) after the z-score, from the definitions (the reference has no
    DIST): z = (z - mean) / (sqrt(sum (z - mean)^2 / (C - 1)) + 1e-7) per row, then
    T^2 (beta (1 - mean row Pearson r) + gamma (1 - mean column Pearson r)) of softmax(z / T),
    r the cosine of the centred vectors, 1e-8 added to the product of their norms (tlkd's
    DIST convention, which is not under test here). ``z_scored`` False: the inputs as given."""

    def z_score(z):
        c = z - z.sum(dim=1, keepdim=True) / z.shape[1]
        return c / ((c.pow(2).sum(dim=1, keepdim=True) / (z.shape[1] - 1)).sqrt() + 1e-7)

    def pearson(a, b):
        a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
        return (a * b).sum(dim=1) / (a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt() + 1e-8)

    if z_scored:
        student, teacher = z_score(student), z_score(teacher)
    p_s = F.softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    inter = 1 - pearson(p_s, p_t).mean()
    intra = 1 - pearson(p_s.t(), p_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def _inputs(dtype, rows=16, classes=10, seed=0):
    """Student and teacher logits of different scales (the case standardization is for)."""
    torch.manual_seed(seed)
    student = torch.randn(rows, classes, dtype=dtype) * 2 + 0.5
    teacher = torch.randn(rows, classes, dtype=dtype) * 6 - 1.0
    target = torch.randint(0, classes, (rows,))
    return student, teacher, target


def _value_and_grad(fn, student):
    x = student.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value, grad


def _assert_same(ours, ref):
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1])


def test_standardize_parity_with_the_reference_normalize():
    """Unbiased std (n - 1) and 1e-7 added to it, as the reference's ``normalize``."""
    z = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]], dtype=torch.float64)
    got = standardize_logits(z)
    # row 0: mean 2, unbiased std 1 (the biased one would be sqrt(2/3)); row 1: constant -> 0
    torch.testing.assert_close(
        got[0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / 1.0000001
    )
    assert got[1].abs().max().item() == 0.0
    for dtype in DTYPES:
        x = _inputs(dtype)[1]
        torch.testing.assert_close(standardize_logits(x), _ref_normalize(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_kd_standardize_parity_with_the_official_code(dtype, temperature):
    """sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py ``kd_loss`` with
    ``logit_stand=True``: value and gradient (the objective: below)."""
    student, teacher, _ = _inputs(dtype)
    ref = _value_and_grad(lambda s: _ref_kd_loss(s, teacher, temperature, True), student)
    ours = _value_and_grad(lambda s: L.kd_loss(s, teacher, temperature, standardize=True), student)
    _assert_same(ours, ref)
    # without standardize: the reference with logit_stand False, i.e. plain KD
    plain = _value_and_grad(lambda s: _ref_kd_loss(s, teacher, temperature, False), student)
    _assert_same(_value_and_grad(lambda s: L.kd_loss(s, teacher, temperature), student), plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("alpha", "beta", "temperature"),
    [(9.0, 72.0, 2.0), (18.0, 36.0, 3.0), (1.0, 8.0, 4.0)],  # README default, res56->res20, DKD
)
def test_dkd_standardize_parity_with_the_official_code(dtype, alpha, beta, temperature):
    """sunshangquan/logit-standardization-KD mdistiller/distillers/DKD.py ``dkd_loss`` with
    ``logit_stand=True``: value and gradient."""
    student, teacher, target = _inputs(dtype)
    ref = _value_and_grad(
        lambda s: _ref_dkd_loss(s, teacher, target, alpha, beta, temperature, True), student
    )
    ours = _value_and_grad(
        lambda s: L.dkd_loss(s, teacher, target, alpha, beta, temperature, standardize=True),
        student,
    )
    _assert_same(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("beta", "gamma", "temperature"), [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0)])
def test_dist_standardize_parity_with_its_definition(dtype, beta, gamma, temperature):
    """The reference has no DIST: standardized DIST is DIST of the z-scored logits (the same
    pre-process as its KD and DKD), against the definition written out here."""
    student, teacher, _ = _inputs(dtype)
    ref = _value_and_grad(lambda s: _def_dist_loss(s, teacher, beta, gamma, temperature), student)
    ours = _value_and_grad(
        lambda s: L.dist_loss(s, teacher, beta, gamma, temperature, standardize=True), student
    )
    _assert_same(ours, ref)


@pytest.mark.parametrize("loss", ["kd", "dkd", "dist"])
def test_standardized_losses_ignore_each_rows_logit_scale_and_shift(loss):
    """The paper's point: the student need not match the teacher's logit range. A per-row
    positive scale and shift of either side's logits leaves the standardized loss unchanged
    (up to the 1e-7 of the std)."""
    student, teacher, target = _inputs(torch.float64)
    fn = {
        "kd": lambda s, t: L.kd_loss(s, t, 2.0, standardize=True),
        "dkd": lambda s, t: L.dkd_loss(s, t, target, 9.0, 72.0, 2.0, standardize=True),
        "dist": lambda s, t: L.dist_loss(s, t, standardize=True),
    }[loss]
    scale = torch.rand(16, 1, dtype=torch.float64) * 5 + 0.2
    shift = torch.randn(16, 1, dtype=torch.float64) * 3
    base = fn(student, teacher)
    torch.testing.assert_close(fn(student * scale + shift, teacher), base)
    torch.testing.assert_close(fn(student, teacher / scale - shift), base)
    assert fn(teacher, teacher * 3 + 1).item() == pytest.approx(0.0, abs=1e-6)  # dist: eps


# --- through the objective: one teacher, several teachers -----------------------------------


def _teacher(seed: int) -> Teacher:
    torch.manual_seed(seed)
    model = timm.create_model("resnet20", num_classes=10)
    return Teacher(model, None, f"t{seed}", False, (0.5,) * 3, (0.5,) * 3)


def _objective(student, teachers, losses, weights):
    classes = [str(i) for i in range(10)]
    return Distillation(
        student, teachers, losses, classes, None, list(weights), 16, torch.device("cpu")
    )


def test_one_teacher_through_the_objective_is_the_parity_reference():
    """One teacher: the objective's kd and dkd parts equal the official code's losses with
    ``logit_stand=True`` (the teacher standardized once, before the term)."""
    teacher = _teacher(0)
    student = timm.create_model("resnet20", num_classes=10).eval()
    losses = [
        LossConfig(type="kd", temperature=2.0, standardize=True),
        LossConfig(type="dkd", alpha=9.0, beta=72.0, temperature=2.0, warmup_epochs=0,
                   standardize=True),
    ]  # fmt: skip
    objective = _objective(student, [teacher], losses, (1.0,))
    images, targets = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    with torch.no_grad():
        out = objective(student, images, targets)
        s, t = student(images), teacher(images)[0]
    torch.testing.assert_close(out.parts["kd"], _ref_kd_loss(s, t, 2.0, True))
    torch.testing.assert_close(out.parts["dkd"], _ref_dkd_loss(s, t, targets, 9.0, 72.0, 2.0, True))


def test_several_teachers_are_standardized_before_the_ensemble():
    """Several teachers: each teacher's logits are z-scored, the target is the weighted mean
    of their softmax at the base temperature (tlkd's one ensemble rule), and only the
    student's logits are z-scored by the term (the ensemble is not z-scored again)."""
    teachers = [_teacher(0), _teacher(1)]
    with torch.no_grad():  # a teacher with a much larger logit scale: no more weight for it
        teachers[1].model.get_classifier().weight.mul_(20.0)
    student = timm.create_model("resnet20", num_classes=10).eval()
    losses = [
        LossConfig(type="kd", temperature=2.0, standardize=True),
        LossConfig(
            type="dkd", warmup_epochs=0, standardize=True, temperature=4.0, alpha=1.0, beta=8.0
        ),
        LossConfig(type="dist", temperature=3.0, standardize=True),
    ]
    objective = _objective(student, teachers, losses, (3.0, 1.0))
    images, targets = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    with torch.no_grad():
        out = objective(student, images, targets)
        s = _ref_normalize(student(images))
        t = [_ref_normalize(teacher(images)[0]) for teacher in teachers]

    def mean_probs(temperature):
        p = [F.softmax(z / temperature, dim=1) for z in t]
        return (3 * p[0] + p[1]) / 4

    def as_logits(temperature):  # logits whose softmax at T is the mean: T log(mean)
        return temperature * mean_probs(temperature).log()

    # the references with logit_stand False: s and the teachers are standardized above
    expected = {
        "kd": _ref_kd_loss(s, as_logits(2.0), 2.0, False),
        "dkd": _ref_dkd_loss(s, as_logits(4.0), targets, 1.0, 8.0, 4.0, False),
        "dist": _def_dist_loss(s, as_logits(3.0), 1.0, 1.0, 3.0, z_scored=False),
    }
    for name, value in expected.items():
        assert out.parts[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name


# --- the config -------------------------------------------------------------------------------


def _config_error(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    message = str(info.value)
    assert "\n" not in message, message
    return info.value


@pytest.mark.parametrize("loss", ["ce", "fitnet", "hard", "at"])
def test_standardize_on_a_loss_without_a_temperature_is_a_config_error(loss):
    error = _config_error({"distill": {"losses": [{"type": loss, "standardize": True}]}})
    assert "distill.losses.0" in str(error)
    assert f"standardize does not apply to loss type {loss!r}" in str(error)


@pytest.mark.parametrize("loss", ["kd", "dkd", "dist"])
def test_standardize_is_accepted_on_temperature_losses(loss):
    assert LossConfig(type=loss).standardize is False  # the default: off
    cfg = validate({"distill": {"losses": [{"type": loss, "standardize": True}, {"type": "ce"}]}})
    assert cfg.distill.losses[0].standardize is True
    assert cfg.distill.losses[1].standardize is None  # does not apply to ce
    error = _config_error({"distill": {"losses": [{"type": loss, "standardize": "maybe"}]}})
    assert "distill.losses.0.standardize" in str(error)


def test_standardize_needs_two_classes_per_task():
    """Per task the student's slice of logits is z-scored: a one-class task's std is NaN, so
    the run would fail at its first step; refused when the objective is built."""
    from tlkd.config.schema import TaskConfig

    teachers = [
        Teacher(
            timm.create_model("resnet20", num_classes=n), None, f"t{n}", False, *[(0.5,) * 3] * 2
        )
        for n in (9, 1)
    ]
    student = timm.create_model("resnet20", num_classes=10)
    classes = [str(i) for i in range(10)]
    tasks = [
        TaskConfig(name="a", classes=classes[:9], teacher=0),
        TaskConfig(name="b", classes=classes[9:], teacher=1),
    ]
    loss = LossConfig(type="kd", standardize=True)
    with pytest.raises(ConfigError, match="distill.tasks.1: kd with standardize"):
        Distillation(student, teachers, [loss], classes, tasks, [1.0, 1.0], 16, torch.device("cpu"))
    plain = LossConfig(type="kd")  # without standardize: a one-class task is fine
    Distillation(student, teachers, [plain], classes, tasks, [1.0, 1.0], 16, torch.device("cpu"))
