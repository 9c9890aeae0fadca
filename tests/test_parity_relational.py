"""Relational feature losses (rkd, pkt, sp): parity of values and gradients (w.r.t. the
student's features) with independent implementations that follow the reference code's
conventions (HobbitLong/RepDistiller, named per test), and one tiny distillation run of all
three from YAML."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import REPO
from safetensors.torch import load_file, save_file

import tlkd.models  # noqa: F401  registers the CIFAR models
from tlkd.config import load_config
from tlkd.config.loader import effective
from tlkd.config.schema import LossConfig
from tlkd.distill.losses.pkt import pkt_loss
from tlkd.distill.losses.rkd import rkd_loss
from tlkd.distill.losses.sp import sp_loss
from tlkd.distill.registry import LOSSES

DTYPES = [torch.float32, torch.float64]


def _leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _check(ours_fn, ref_fn, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> None:
    """Value and gradient w.r.t. every student tensor agree."""
    ours_in, ref_in = _leaves(student), _leaves(student)
    ours, ref = ours_fn(ours_in, teacher), ref_fn(ref_in, teacher)
    assert ours.dim() == 0 and torch.isfinite(ours)
    torch.testing.assert_close(ours, ref.reshape(()))
    grads = zip(torch.autograd.grad(ours, ours_in), torch.autograd.grad(ref, ref_in), strict=True)
    for a, b in grads:
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


# --- RKD ------------------------------------------------------------------------------------


def _ref_pdist(e, eps=1e-12):
    """RepDistiller's pairwise distances: |a|^2 + |b|^2 - 2ab, floored at eps, square root,
    then the diagonal set to 0 in a copy."""
    sq = (e * e).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())
    d = d2.clamp(min=eps).sqrt().clone()
    idx = list(range(e.shape[0]))
    d[idx, idx] = 0
    return d


def _ref_angles(e):
    """Cosines at vertex i of the vectors to j and k: normalise e[j] - e[i], batched products."""
    vec = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(vec, vec.transpose(1, 2)).reshape(-1)


def _ref_rkd(f_s, f_t, w_d=25.0, w_a=50.0):
    """Following HobbitLong/RepDistiller distiller_zoo/RKD.py (RKDLoss, defaults w_d=25,
    w_a=50): features flattened per sample; distances divided by the mean of the positive
    ones; smooth L1 (mean) on distances and on angles; the teacher's side without gradient."""
    s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = _ref_pdist(t)
        t_d = t_d / t_d[t_d > 0].mean()
        t_a = _ref_angles(t)
    s_d = _ref_pdist(s)
    s_d = s_d / s_d[s_d > 0].mean()
    s_a = _ref_angles(s)
    return w_d * F.smooth_l1_loss(s_d, t_d) + w_a * F.smooth_l1_loss(s_a, t_a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [((16, 64), (16, 128)), ((8, 16, 2, 2), (8, 32))],  # embeddings; a map is flattened
)
def test_rkd_parity_with_repdistiller(dtype, s_shape, t_shape):
    """HobbitLong/RepDistiller distiller_zoo/RKD.py on one pair (train_student.py: feat[-1],
    the embedding), default weights 25 / 50."""
    torch.manual_seed(0)
    # one far-off student row: its normalised distances differ from the teacher's by more
    # than 1, so both branches of the smooth L1 are exercised
    student = torch.randn(s_shape, dtype=dtype)
    student[0] += 10 * torch.randn(s_shape[1:], dtype=dtype)
    teacher = torch.randn(t_shape, dtype=dtype)
    s_d, t_d = _ref_pdist(student.flatten(1)), _ref_pdist(teacher)
    assert ((s_d / s_d[s_d > 0].mean() - t_d / t_d[t_d > 0].mean()).abs() > 1).any()
    _check(
        lambda s, t: rkd_loss(s, t),
        lambda s, t: _ref_rkd(s[0], t[0]),
        [student],
        [teacher],
    )
    cfg = LossConfig(type="rkd")
    assert (cfg.distance_weight, cfg.angle_weight) == (25.0, 50.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rkd_parity_other_weights_and_pairs_summed(dtype):
    """RepDistiller RKDLoss(w_d=1, w_a=2) per pair; several pairs are summed (tlkd's rule)."""
    torch.manual_seed(1)
    student = [torch.randn(12, 32, dtype=dtype), torch.randn(12, 8, dtype=dtype).relu()]
    teacher = [torch.randn(12, 64, dtype=dtype), torch.randn(12, 16, dtype=dtype).relu()]
    _check(
        lambda s, t: rkd_loss(s, t, distance_weight=1.0, angle_weight=2.0),
        lambda s, t: sum(_ref_rkd(a, b, 1.0, 2.0) for a, b in zip(s, t, strict=True)),
        student,
        teacher,
    )


def test_rkd_of_a_single_row_is_zero():
    one = torch.randn(1, 8, requires_grad=True)
    loss = rkd_loss([one], [torch.randn(1, 8)])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(one.grad, torch.zeros_like(one))


# --- PKT ------------------------------------------------------------------------------------


def _ref_pkt(output_net, target_net, eps=1e-7):
    """Following HobbitLong/RepDistiller distiller_zoo/PKT.py (cosine_similarity_loss, eps
    1e-7): rows divided by sqrt(sum of squares) + eps, NaN set to 0, cosine kernel mapped to
    0..1 by (x + 1) / 2, rows normalised to sum 1, then mean of p_t * log((p_t + eps) /
    (p_s + eps)) over all entries."""

    def probs(x):
        x = x / (torch.sqrt((x**2).sum(dim=1, keepdim=True)) + eps)
        x[x != x] = 0
        k = (torch.mm(x, x.t()) + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    p_s, p_t = probs(output_net), probs(target_net)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("s_dim", "t_dim", "relu"), [(64, 32, False), (64, 128, True)])
def test_pkt_parity_with_repdistiller(dtype, s_dim, t_dim, relu):
    """HobbitLong/RepDistiller distiller_zoo/PKT.py on one pair (train_student.py: feat[-1],
    the embedding); with ``relu`` the non-negative features a pooled ReLU network gives."""
    torch.manual_seed(0)
    student = torch.randn(16, s_dim, dtype=dtype)
    teacher = torch.randn(16, t_dim, dtype=dtype)
    if relu:
        student, teacher = student.relu(), teacher.relu()
    _check(lambda s, t: pkt_loss(s, t), lambda s, t: _ref_pkt(s[0], t[0]), [student], [teacher])


@pytest.mark.parametrize("dtype", DTYPES)
def test_pkt_parity_pairs_summed(dtype):
    """Several pairs: the sum of RepDistiller's PKT per pair (tlkd's rule); a map is
    flattened per sample first."""
    torch.manual_seed(2)
    student = [torch.randn(10, 24, dtype=dtype), torch.randn(10, 4, 3, 3, dtype=dtype)]
    teacher = [torch.randn(10, 48, dtype=dtype), torch.randn(10, 8, 3, 3, dtype=dtype)]
    _check(
        pkt_loss,
        lambda s, t: sum(_ref_pkt(a.flatten(1), b.flatten(1)) for a, b in zip(s, t, strict=True)),
        student,
        teacher,
    )


# --- SP -------------------------------------------------------------------------------------


def _ref_sp(g_s, g_t):
    """Following HobbitLong/RepDistiller distiller_zoo/SP.py (Similarity): per pair the Gram
    matrix of the flattened features, rows L2-normalised (F.normalize), squared differences
    summed as a (1,) tensor divided by bsz^2; a list, one loss per pair."""
    out = []
    for f_s, f_t in zip(g_s, g_t, strict=True):
        bsz = f_s.shape[0]
        a, b = f_s.view(bsz, -1), f_t.view(bsz, -1)
        gram_s = F.normalize(torch.mm(a, a.t()))
        gram_t = F.normalize(torch.mm(b, b.t()))
        diff = gram_t - gram_s
        out.append((diff * diff).view(-1, 1).sum(0) / (bsz * bsz))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shapes",
    [
        [((16, 64, 8, 8), (16, 64, 8, 8))],  # one pair: the last stage (feat[-2])
        [((8, 16, 8, 8), (8, 32, 4, 4)), ((8, 32, 4, 4), (8, 128, 2, 2))],  # two pairs
    ],
)
def test_sp_parity_with_repdistiller(dtype, shapes):
    """HobbitLong/RepDistiller distiller_zoo/SP.py, the per-pair losses summed as
    helper/loops.py does (``loss_kd = sum(loss_group)``, g_s = [feat_s[-2]])."""
    torch.manual_seed(0)
    student = [torch.randn(s, dtype=dtype).relu() for s, _ in shapes]
    teacher = [torch.randn(t, dtype=dtype).relu() for _, t in shapes]
    _check(sp_loss, lambda s, t: sum(_ref_sp(s, t)), student, teacher)


# --- under autocast (train.precision bf16/fp16) ----------------------------------------------


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp"])
def test_relational_losses_are_float32_under_autocast(name):
    """The objective runs the terms inside the step's autocast. These losses measure small
    differences of Gram matrices and batch-normalised probabilities (PKT's ~1/N each), which a
    bf16 matmul rounds away (PKT off by 10x, SP by 75% in bf16): they compute in float32,
    so under CPU bf16 autocast they still equal the references (in float64 here; float32's
    own rounding of these tiny values is ~1e-4 relative, bf16's is ~1)."""
    torch.manual_seed(0)
    if name == "sp":
        student = torch.randn(32, 16, 4, 4).relu()
        fns = (sp_loss, lambda s, t: sum(_ref_sp(s, t)))
    else:
        student = torch.randn(32, 64).relu()
        fns = {
            "rkd": (rkd_loss, lambda s, t: _ref_rkd(s[0], t[0])),
            "pkt": (pkt_loss, lambda s, t: _ref_pkt(s[0], t[0])),
        }[name]
    teacher = student + 0.05 * torch.randn_like(student)  # a student close to its teacher
    ours_in, ref_in = _leaves([student]), _leaves([student.double()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fns[0](ours_in, [teacher])
    ref = fns[1](ref_in, [teacher.double()]).reshape(())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=2e-3, atol=0)
    (g_ours,), (g_ref,) = torch.autograd.grad(ours, ours_in), torch.autograd.grad(ref, ref_in)
    scale = g_ref.abs().max().item()
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=0, atol=2e-3 * scale)


# --- the registry, the shipped configs, one tiny run ----------------------------------------


def test_entries_read_repdistillers_features():
    """train_student.py / helper/loops.py: rkd and pkt read feat[-1] (the embedding), sp
    feat[-2] (the last stage's map)."""
    assert {n: (LOSSES[n].inputs, LOSSES[n].layers) for n in ("rkd", "pkt", "sp")} == {
        "rkd": ("features", "embedding"),
        "pkt": ("features", "embedding"),
        "sp": ("features", "last"),
    }


def test_shipped_configs_use_repdistillers_weights():
    """RepDistiller scripts/run_cifar_distill.sh: rkd -b 1, pkt -b 30000, similarity -b 3000,
    each with -a 0 (no KD) and the default -r 1 (cross-entropy 1)."""
    folder = REPO / "configs" / "cifar10-distill"
    teacher = load_config(folder / "kd.yaml").teacher
    for name, weight in {"rkd": 1.0, "pkt": 30000.0, "sp": 3000.0}.items():
        cfg = load_config(folder / f"{name}.yaml")
        assert cfg.experiment == f"c10-resnet20-{name}"
        assert cfg.teacher == teacher
        assert [(loss.type, loss.weight) for loss in cfg.distill.losses] == [
            (name, weight),
            ("ce", 1.0),
        ]


def test_rkd_pkt_sp_run_in_a_tiny_distillation_from_yaml(tmp_path, write_config, run_cli):
    """All three losses (defaults: their layers chosen by the entry) with ce, one epoch on
    the embedded digits at 16 px; a resnet20 student learns from a test_resnet teacher (96-d
    embedding, another width than the student's 64)."""
    torch.manual_seed(0)
    teacher = timm.create_model("test_resnet", num_classes=10)
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    config = write_config(
        {
            "experiment": "relational",
            "output_dir": str(tmp_path / "runs"),
            "seed": 0,
            "model": {"name": "resnet20", "pretrained": False},
            "teacher": {"name": "test_resnet", "pretrained": str(weights)},
            "data": {
                "dataset": "digits",
                "image_size": 16,
                "samples_per_class": 6,
                "num_workers": 0,
            },
            "train": {
                "epochs": 1,
                "batch_size": 12,
                "device": "cpu",
                "precision": "fp32",
                "channels_last": False,
                "log_every": 1000,
            },
            "distill": {
                "losses": [
                    {"type": "rkd"},
                    {"type": "pkt", "weight": 100},
                    {"type": "sp", "weight": 100},
                    {"type": "ce"},
                ]
            },
        }
    )
    proc = run_cli("distill", config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "runs" / "relational"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    for name in ("rkd", "pkt", "sp", "ce"):
        value = rows[0][f"train_loss_{name}"]
        assert math.isfinite(value) and value > 0, (name, value)
    # the plan names each term's reference, settings and layers (from the registry)
    plan = {ln[:11].strip(): ln[12:] for ln in proc.stdout.splitlines() if ln[:11].strip()}
    assert "distance_weight 25; angle_weight 50; layers ['pre_logits']" in plan["rkd"]
    assert plan["pkt"].startswith("probabilistic knowledge transfer (Passalis & Tefas 2018)")
    assert "layers [3] -> teacher [4]" in plan["sp"]
    # rkd's two terms are logged apart (weighted as in the sum) and add up to it
    distance, angle = rows[0]["train_loss_rkd_distance"], rows[0]["train_loss_rkd_angle"]
    assert distance > 0 and angle > 0
    assert distance + angle == pytest.approx(rows[0]["train_loss_rkd"], rel=1e-5)
    resolved = effective(load_config(run / "config.yaml")).distill.losses
    assert [(loss.student_layers, loss.teacher_layers) for loss in resolved[:3]] == [
        (["pre_logits"], ["pre_logits"]),
        (["pre_logits"], ["pre_logits"]),
        ([3], [4]),  # the last stage of each: resnet20 has 4 feature stages, test_resnet 5
    ]
    saved = load_file(run / "model.safetensors")
    assert set(saved) == set(timm.create_model("resnet20", num_classes=10).state_dict())
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["epochs_done"]) == ("finished", 1)
