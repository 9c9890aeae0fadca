"""tlkd distill: teachers stay frozen, losses compose, multi-teacher, multi-task, export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import tlkd  # noqa: F401  registers the CIFAR models
from tlkd.config import load_config
from tlkd.config.schema import LossConfig, TeacherConfig
from tlkd.distill import losses as L
from tlkd.distill.objective import Distillation
from tlkd.distill.teacher import build_teacher
from tlkd.errors import ConfigError
from tlkd.recipes.distill import distill
from tlkd.recipes.export import export

SMALL = [
    "data.dataset=digits",
    "data.image_size=16",
    "data.samples_per_class=6",
    "data.num_workers=0",
    "train.batch_size=12",
    "train.epochs=1",
    "train.log_every=1000",
    "train.precision=fp32",
    "train.channels_last=false",
]


def _teacher_file(tmp_path: Path, name: str, num_classes: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes)
    path = tmp_path / f"{name}-{num_classes}-{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _objective(student, teachers, losses, weights=(1.0,)):
    """A distillation objective over the 10 digit classes at 16 px, on the CPU."""
    classes = [str(i) for i in range(10)]
    device = torch.device("cpu")
    return Distillation(student, teachers, losses, classes, None, list(weights), 16, device)


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path / 'runs'}", *SMALL, *overrides])


def test_cifar_models_are_registered_in_timm():
    sizes = {"resnet20": 0.27e6, "resnet56": 0.86e6, "resnet110": 1.73e6, "wrn_40_2": 2.24e6}
    for name, params in sizes.items():
        model = timm.create_model(name, num_classes=10)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.02)
        final, feats = model.forward_intermediates(torch.zeros(2, 3, 32, 32))
        assert [f.shape[-1] for f in feats] == [32, 32, 16, 8]
        assert model.forward_head(final).shape == (2, 10)
    for name in ("resnet32", "resnet8x4", "resnet32x4", "wrn_16_2"):
        assert timm.create_model(name, num_classes=3)(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_teacher_is_frozen_and_never_modified(tmp_path):
    file = _teacher_file(tmp_path, "resnet20", 10)
    for train_bn in (False, True):
        teacher = build_teacher(
            TeacherConfig(name="resnet20", pretrained=str(file), train_bn=train_bn),
            "teacher",
            (0.5,) * 3,
            (0.5,) * 3,
        )
        before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
        student = timm.create_model("resnet20", num_classes=10)
        losses = [LossConfig(type="kd"), LossConfig(type="fitnet"), LossConfig(type="at")]
        objective = _objective(student, [teacher], losses)
        opt = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=0.1)
        for _ in range(3):
            out = objective(student, torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        assert all(not p.requires_grad for p in teacher.model.parameters())
        after = teacher.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        # the teacher is not part of the objective's (checkpointed, optimised) state
        assert not any(k.startswith("teacher") for k in objective.state_dict())
        assert set(out.parts) == {"kd", "fitnet", "at"}


def test_loss_terms_compose_with_weights(tmp_path):
    file = _teacher_file(tmp_path, "resnet20", 10)
    teacher = build_teacher(
        TeacherConfig(name="resnet20", pretrained=str(file)), "teacher", (0.5,) * 3, (0.5,) * 3
    )
    student = timm.create_model("resnet20", num_classes=10)
    losses = [
        LossConfig(type="kd", weight=0.7, temperature=2.0),
        LossConfig(type="ce", weight=0.3),
        LossConfig(type="hard", weight=0.0),
    ]
    objective = _objective(student, [teacher], losses)
    student.eval()
    images, targets = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    out = objective(student, images, targets)
    s_logits = student(images)
    t_logits, _ = teacher(images)
    kd = L.kd_loss(s_logits, t_logits, 2.0)
    ce = torch.nn.functional.cross_entropy(s_logits, targets)
    assert out.parts["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(0.7 * kd.item() + 0.3 * ce.item(), rel=1e-5)


def test_multi_teacher_averages_soft_targets_with_weights(tmp_path):
    teachers = [
        build_teacher(
            TeacherConfig(
                name="resnet20", pretrained=str(_teacher_file(tmp_path, "resnet20", 10, s))
            ),
            f"teachers.{s}",
            (0.5,) * 3,
            (0.5,) * 3,
        )
        for s in (0, 1)
    ]
    student = timm.create_model("resnet20", num_classes=10).eval()
    objective = _objective(student, teachers, [LossConfig(type="kd", temperature=3.0)], (3.0, 1.0))
    images = torch.randn(4, 3, 16, 16)
    out = objective(student, images, torch.zeros(4, dtype=torch.long))
    probs = [torch.softmax(t(images)[0] / 3.0, dim=1) for t in teachers]
    target = (3.0 * probs[0] + 1.0 * probs[1]) / 4.0
    expected = L.kd_loss_from_probs(student(images), target, 3.0)
    assert out.parts["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_distill_run_saves_student_without_adapters(tmp_path):
    file = _teacher_file(tmp_path, "resnet20", 10)
    teacher_bytes = file.read_bytes()
    cfg = _cfg(
        tmp_path,
        "model.name=resnet20",
        "teacher.name=resnet20",
        f"teacher.pretrained={file}",
        "distill.losses=[{type: kd, weight: 0.5}, {type: ce, weight: 0.5}, {type: fitnet}]",
    )
    summary = distill(cfg)
    run = Path(summary["run_dir"])
    saved = load_file(run / "model.safetensors")
    fresh = timm.create_model("resnet20", num_classes=10).state_dict()
    assert set(saved) == set(fresh)  # no adapter weights in the student
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert any(k.startswith("adapters.") for k in ckpt["objective"])  # but they are checkpointed
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_loss_kd", "train_loss_ce", "train_loss_fitnet"} <= set(row)
    assert summary["teachers"][0]["params"] == summary["student_params"] == 272_474
    assert summary["student_latency_ms"] > 0 and summary["teacher0_latency_ms"] > 0
    resolved = load_config(run / "config.yaml")
    assert resolved.distill.losses[2].student_layers == [1, 2, 3]  # the chosen stages, saved
    assert file.read_bytes() == teacher_bytes


def test_logit_loss_needs_teacher_with_the_same_classes(tmp_path):
    file = _teacher_file(tmp_path, "resnet20", 5)
    cfg = _cfg(
        tmp_path,
        "model.name=resnet20",
        "teacher.name=resnet20",
        f"teacher.pretrained={file}",
        "distill.losses=[{type: kd}]",
    )
    with pytest.raises(ConfigError, match="same classes"):
        distill(cfg, dry_run=True)
    # across tasks, features still teach: fitnet/at with a 5-class teacher and 10-class labels
    cfg = _cfg(
        tmp_path,
        "model.name=resnet20",
        "teacher.name=resnet20",
        f"teacher.pretrained={file}",
        "distill.losses=[{type: at, weight: 10}, {type: ce}]",
    )
    assert distill(cfg)["best_val_top1"] is not None


def test_missing_teacher_weights_name_the_teacher_key(tmp_path):
    (tmp_path / "not-a-run").mkdir()
    for where, key in [
        ("teacher={{name: resnet20, pretrained: {}}}", "teacher.pretrained"),
        ("teachers=[{{name: resnet20, pretrained: {}}}]", "teachers.0.pretrained"),
    ]:
        for path in (tmp_path / "not-a-run", tmp_path / "missing.safetensors"):
            cfg = _cfg(tmp_path, "model.name=resnet20", where.format(path))
            with pytest.raises(ConfigError) as err:
                distill(cfg, dry_run=True)
            assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_multi_task_student_serves_both_teachers(tmp_path):
    t_low = _teacher_file(tmp_path, "resnet20", 5, 0)
    t_high = _teacher_file(tmp_path, "resnet20", 5, 1)
    cfg = _cfg(
        tmp_path,
        "model.name=resnet20",
        f"teachers=[{{name: resnet20, pretrained: {t_low}}},"
        f" {{name: resnet20, pretrained: {t_high}}}]",
        "distill.losses=[{type: kd}, {type: ce}]",
        "distill.tasks=[{name: low, classes: ['0','1','2','3','4'], teacher: 0},"
        " {name: high, classes: ['5','6','7','8','9'], teacher: 1}]",
    )
    summary = distill(cfg)
    row = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= row["val_top1_low"] <= 100.0 and 0.0 <= row["val_top1_high"] <= 100.0
    assert summary["classes"] == [str(i) for i in range(10)]


def test_finetune_rejects_teachers_and_cli_exit_code(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("teacher: {name: resnet20}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tlkd", "finetune", str(cfg), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: teacher:") and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "tlkd", "distill", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(tmp_path, fmt):
    file = _teacher_file(tmp_path, "resnet20", 10)
    cfg = _cfg(
        tmp_path,
        "model.name=resnet20",
        "teacher.name=resnet20",
        f"teacher.pretrained={file}",
        f"experiment=exp-{fmt}",
    )
    run = distill(cfg)["run_dir"]
    report = export(run, fmt)
    assert report["verified"] and report["max_abs_diff"] < 1e-4
    assert Path(report["file"]).is_file()


def test_layers_by_stage_index_or_module_name_agree():
    from tlkd.distill.features import FeatureTap, resolve_layers

    model = timm.create_model("resnet20", num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        by_index = FeatureTap(model, [2, 3])(images)
        by_name = FeatureTap(model, ["stages.1", "stages.2"])(images)
    assert torch.equal(by_index[0], by_name[0])  # same logits
    assert all(torch.equal(a, b) for a, b in zip(by_index[1], by_name[1], strict=True))
    assert resolve_layers(model, None, "k") == [1, 2, 3]  # default: the last three stages
    with pytest.raises(ConfigError, match="did you mean 'stages.1'"):
        resolve_layers(model, ["stage.1"], "distill.losses.0.student_layers")
    with pytest.raises(ConfigError, match="stage 7 does not exist"):
        resolve_layers(model, [7], "distill.losses.0.student_layers")
