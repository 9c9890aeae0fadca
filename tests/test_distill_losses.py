"""The distillation losses' math, on hand-made tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from tlkd.distill import losses as L


def test_kd_matches_hand_computed_kl_times_t_squared():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax: [0.75, 0.25]
    expected_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert L.kd_loss(student, teacher, temperature=1.0).item() == pytest.approx(
        expected_t1, rel=1e-5
    )
    # T=2: teacher softmax of [ln3/2, 0] = [sqrt3, 1] / (sqrt3 + 1)
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    expected_t2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert L.kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(
        expected_t2, rel=1e-5
    )


def test_kd_is_zero_for_identical_logits_and_matches_prob_form():
    logits = torch.randn(5, 7)
    assert L.kd_loss(logits, logits.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    student, teacher = torch.randn(5, 7), torch.randn(5, 7)
    probs = F.softmax(teacher / 3.0, dim=1)
    assert L.kd_loss_from_probs(student, probs, 3.0).item() == pytest.approx(
        L.kd_loss(student, teacher, 3.0).item(), rel=1e-5
    )


def test_hard_is_cross_entropy_on_teacher_argmax():
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 5.0, 0.0], [0.0, 3.0, 1.0]])  # argmax: 1, 1
    expected = F.cross_entropy(student, torch.tensor([1, 1]))
    assert L.hard_loss(student, teacher).item() == pytest.approx(expected.item())


def test_dkd_decomposes_kd():
    # Zhao et al.: KD = TCKD + (1 - p_t(target)) * NCKD, per sample
    torch.manual_seed(0)
    student, teacher, target = torch.randn(1, 6), torch.randn(1, 6), torch.tensor([2])
    t = 2.0
    tckd = L.dkd_loss(student, teacher, target, alpha=1.0, beta=0.0, temperature=t)
    nckd = L.dkd_loss(student, teacher, target, alpha=0.0, beta=1.0, temperature=t)
    p_target = F.softmax(teacher / t, dim=1)[0, 2]
    kd = L.kd_loss(student, teacher, temperature=t)
    assert (tckd + (1 - p_target) * nckd).item() == pytest.approx(kd.item(), rel=1e-4)
    assert L.dkd_loss(teacher, teacher.clone(), target).item() == pytest.approx(0.0, abs=1e-5)


def test_dist_zero_for_same_relations_positive_for_reversed():
    teacher = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    assert L.dist_loss(teacher, teacher.clone()).item() == pytest.approx(0.0, abs=1e-5)
    reversed_student = -teacher
    inter_only = L.dist_loss(reversed_student, teacher, beta=1.0, gamma=0.0).item()
    # reversed scores anti-correlate each row: 1 - r > 1
    assert inter_only > 1.0


def test_dist_inter_term_is_one_minus_pearson():
    s = torch.tensor([[1.0, 2.0, 4.0]])
    t = torch.tensor([[4.0, 2.0, 1.0]])
    p_s, p_t = F.softmax(s, dim=1)[0], F.softmax(t, dim=1)[0]
    r = torch.corrcoef(torch.stack([p_s, p_t]))[0, 1]
    got = L.dist_loss(s, t, beta=1.0, gamma=0.0, temperature=1.0)
    assert got.item() == pytest.approx((1 - r).item(), rel=1e-4)


def test_attention_map_and_at_loss():
    f = torch.zeros(1, 2, 2, 2)
    f[0, :, 0, 0] = 1.0  # one hot spot in both channels
    amap = L.attention_map(f)
    assert amap[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    g = torch.zeros(1, 2, 2, 2)
    g[0, :, 1, 1] = 3.0
    # normalised maps [1,0,0,0] vs [0,0,0,1]: mean squared difference = 2/4
    assert L.at_loss([f], [g]).item() == pytest.approx(0.5)
    assert L.at_loss([f], [f * 7]).item() == pytest.approx(0.0, abs=1e-7)
    # a map of another size is pooled to the smaller one's size
    big = torch.ones(1, 3, 4, 4)
    assert L.at_loss([big], [torch.ones(1, 5, 2, 2)]).item() == pytest.approx(0.0, abs=1e-6)


def test_at_sums_stages_and_pools_the_larger_map():
    f, g = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    f[0, :, 0, 0], g[0, :, 1, 1] = 1.0, 3.0  # per stage: 0.5 (see above)
    assert L.at_loss([f, f], [g, g]).item() == pytest.approx(1.0)  # summed, not averaged
    # a 4x4 student map is average-pooled to the teacher's 2x2 (a spot in the top-left
    # 2x2 block becomes the pooled map's top-left cell), and the other way round
    big = torch.zeros(1, 3, 4, 4)
    big[0, :, 1, 0] = 2.0
    assert L.at_loss([big], [f]).item() == pytest.approx(0.0, abs=1e-7)
    assert L.at_loss([f], [big]).item() == pytest.approx(0.0, abs=1e-7)
    assert L.at_loss([big], [g]).item() == pytest.approx(0.5)


def test_fitnet_sums_mse_over_pairs():
    a, b = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    c, d = torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 3.0)
    assert L.fitnet_loss([a, c], [b, d]).item() == pytest.approx(1.0 + 9.0)


def test_ensemble_logits_soften_to_the_weighted_mean_of_probabilities():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    for t in (1.0, 4.0):
        z = L.ensemble_logits([a, b], [3.0, 1.0], t)
        mean = (3 * F.softmax(a / t, dim=1) + F.softmax(b / t, dim=1)) / 4
        torch.testing.assert_close(F.softmax(z / t, dim=1), mean)
    assert L.ensemble_logits([a], [2.0], 4.0) is a  # one teacher: unchanged


def test_dkd_target_gradient_survives_a_large_margin():
    # student: the target 30 logits above the rest; teacher: p(target) = 0.76. The
    # target-logit gradient of TCKD (alpha 1, T 1) is p_s(target) - p_t(target) = 0.24
    student = torch.tensor([[30.0, 0.0, 0.0, 0.0]], requires_grad=True)
    rest = math.log(0.24 / 3 / 0.76)
    teacher = torch.tensor([[0.0, rest, rest, rest]])
    loss = L.dkd_loss(student, teacher, torch.tensor([0]), alpha=1.0, beta=0.0, temperature=1.0)
    (grad,) = torch.autograd.grad(loss, student)
    assert grad[0, 0].item() == pytest.approx(0.24, abs=1e-4)
    assert torch.isfinite(grad).all()
