"""tlkd distill: teachers stay frozen, losses compose, multi-teacher, multi-task, export."""

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import error_line
from safetensors.torch import load_file, save_file

import tlkd.models  # noqa: F401  registers the CIFAR models
from tlkd.config import load_config
from tlkd.config.loader import effective
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
    assert any(".regressors." in k for k in ckpt["objective"])  # but they are checkpointed
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_loss_kd", "train_loss_ce", "train_loss_fitnet"} <= set(row)
    assert summary["teachers"][0]["params"] == summary["student_params"] == 272_474
    assert summary["student_latency_ms"] > 0 and summary["teacher0_latency_ms"] > 0
    resolved = effective(load_config(run / "config.yaml"))
    # fitnet's default: one hint layer, stage 2 (RepDistiller's hint_layer=2), saved
    assert resolved.distill.losses[2].student_layers == [2]
    assert resolved.distill.losses[2].teacher_layers == [2]
    assert all(
        row["train_teacher_top1"] is not None
        for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    )
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


def test_finetune_rejects_teachers_and_cli_exit_code(tmp_path, run_cli):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("teacher: {name: resnet20}\n")
    proc = run_cli("finetune", cfg, "--dry-run")
    assert proc.returncode == 2
    assert error_line(proc).startswith("error: teacher:")
    proc = run_cli("distill", tmp_path / "missing.yaml")
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


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv3_small_050"])
def test_pre_logits_is_what_the_classifier_reads(name):
    """The ``embedding`` kind (rkd, pkt, crd) taps the classifier's input: pooled and
    flattened, and the classifier applied to it gives the model's own logits; the other kinds
    pick the last stage, the hint stage or the last three stages."""
    from tlkd.distill.features import FeatureTap, resolve_layers

    model = timm.create_model(name, num_classes=10).eval()
    images = torch.randn(2, 3, 32, 32)
    layers = resolve_layers(model, None, "k", "embedding")
    assert layers == ["pre_logits"]
    with torch.no_grad():
        logits, (pre, stage) = FeatureTap(model, [*layers, 2])(images)
        assert torch.allclose(logits, model(images), atol=1e-5)
        assert pre.shape == (2, model.num_features if name == "resnet20" else 1024)
        assert torch.allclose(model.get_classifier()(pre), logits, atol=1e-5)
        assert stage.ndim == 4
    stages = len(model.feature_info)
    assert resolve_layers(model, None, "k", "last") == [stages - 1]
    assert resolve_layers(model, None, "k", "hint") == [2]
    assert resolve_layers(model, ["pre_logits"], "k") == ["pre_logits"]


def _teacher(seed: int = 0, num_classes: int = 10, classes: list[str] | None = None):
    from tlkd.distill.teacher import Teacher

    torch.manual_seed(seed)
    model = timm.create_model("resnet20", num_classes=num_classes)
    return Teacher(model, classes, f"t{seed}", False, (0.5,) * 3, (0.5,) * 3)


def test_every_logit_loss_learns_from_the_weighted_mean_of_softened_probabilities():
    """One rule for several teachers: kd, hard, dkd and dist each compare the student with
    the weighted mean of the teachers' softmax at the loss's temperature (hard: T=1)."""
    teachers = [_teacher(0), _teacher(1)]
    student = timm.create_model("resnet20", num_classes=10).eval()
    losses = [
        LossConfig(type="kd", temperature=3.0),
        LossConfig(type="hard"),
        LossConfig(type="dkd", warmup_epochs=0),
        LossConfig(type="dist", temperature=2.0),
    ]
    objective = _objective(student, teachers, losses, (3.0, 1.0))
    images, targets = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    with torch.no_grad():
        out = objective(student, images, targets)
        s = student(images)
        t = [teacher(images)[0] for teacher in teachers]

    def mean_probs(temperature):
        return (3 * torch.softmax(t[0] / temperature, 1) + torch.softmax(t[1] / temperature, 1)) / 4

    # logits whose softmax at T is the mean: T * log(mean)
    def as_logits(temperature):
        return temperature * mean_probs(temperature).log()

    expected = {
        "kd": L.kd_loss_from_probs(s, mean_probs(3.0), 3.0),
        "hard": torch.nn.functional.cross_entropy(s, mean_probs(1.0).argmax(1)),
        "dkd": L.dkd_loss(s, as_logits(4.0), targets, 1.0, 8.0, 4.0),
        "dist": L.dist_loss(s, as_logits(2.0), 1.0, 1.0, 2.0),
    }
    for name, value in expected.items():
        assert out.parts[name].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), name


def test_a_superset_teacher_teaches_through_the_students_classes():
    """A teacher of 10 named classes teaches a student of 3 of them, in the student's order,
    through every logit loss; partly overlapping classes stay an error."""
    names = [f"c{i}" for i in range(10)]
    teacher = _teacher(0, 10, names)
    student = timm.create_model("resnet20", num_classes=3).eval()
    mine = ["c7", "c2", "c5"]
    losses = [
        LossConfig(type="kd"),
        LossConfig(type="hard"),
        LossConfig(type="dkd", warmup_epochs=0),
        LossConfig(type="dist"),
    ]
    cpu = torch.device("cpu")
    objective = Distillation(student, [teacher], losses, mine, None, [1.0], 16, cpu)
    images, targets = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        out = objective(student, images, targets)
        s, t = student(images), teacher(images)[0][:, [7, 2, 5]]
    expected = {
        "kd": L.kd_loss(s, t, 4.0),
        "hard": L.hard_loss(s, t),
        "dkd": L.dkd_loss(s, t, targets, 1.0, 8.0, 4.0),
        "dist": L.dist_loss(s, t),
    }
    for name, value in expected.items():
        assert out.parts[name].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name
    hits = (t.argmax(1) == targets).sum().item()
    assert objective.train_metrics()["train_teacher_top1"] == pytest.approx(100 * hits / 5)
    partial = ["c7", "c2", "elephant"]
    with pytest.raises(ConfigError, match="same classes"):
        Distillation(student, [teacher], [LossConfig(type="kd")], partial, None, [1.0], 16, cpu)
    # tasks: each task's classes may be a subset of its teacher's
    from tlkd.config.schema import TaskConfig

    tasks = [TaskConfig(name="a", classes=["c7", "c2"], teacher=0)]
    two = timm.create_model("resnet20", num_classes=2).eval()
    objective = Distillation(
        two, [teacher], [LossConfig(type="kd")], ["c7", "c2"], tasks, [1.0], 16, cpu
    )
    with torch.no_grad():
        got = objective(two, images, targets.clamp(max=1)).parts["kd"]
        want = L.kd_loss(two(images), teacher(images)[0][:, [7, 2]], 4.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_superset_teacher_run_dir_in_plan_and_training(tmp_path, capsys):
    """A tlkd run directory trained on all 10 digits teaches a student of 3 of them: the plan
    says so, the teacher's val top-1 is measured among the student's classes, and the
    teacher cache serves its logits too."""
    from tlkd.engine.progress import Reporter
    from tlkd.recipes.finetune import finetune

    teacher_run = finetune(
        _cfg(tmp_path, "model.name=resnet20", "experiment=teacher"), reporter=Reporter(quiet=True)
    )["run_dir"]
    base = [
        "model.name=resnet20",
        "teacher.name=resnet20",
        f"teacher.pretrained={teacher_run}",
        "data.classes=['7','2','5']",
        f"data.cache_dir={tmp_path / 'cache'}",
        "distill.losses=[{type: kd}, {type: hard}, {type: dkd}, {type: dist}, {type: ce}]",
    ]
    distill(_cfg(tmp_path, *base), dry_run=True)
    plan = capsys.readouterr().out
    lines = [ln for ln in plan.splitlines() if ln.startswith("teacher 0") and "superset" in ln]
    assert len(lines) == 1 and "10 classes" in lines[0] and "student's 3" in lines[0], plan
    assert "val top-1 n/a" not in plan
    summary = distill(_cfg(tmp_path, *base, "distill.cache.views=1", "experiment=cached"))
    assert summary["teachers"][0]["val_top1"] is not None
    # the teacher's val pass and the runtime timing are start-up phases of their own
    assert {"teachers", "teacher_runtime", "teacher_val"} <= summary["startup_s"].keys()
    row = json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= row["train_teacher_top1"] <= 100.0 and "train_loss_dkd" in row


def test_teacher_far_worse_on_training_views_warns_about_augmentation(
    tmp_path, capsys, monkeypatch
):
    import tlkd.recipes.distill as recipe

    monkeypatch.setattr(recipe, "_teacher_top1", lambda *a: 99.0)  # "val": a great teacher
    file = _teacher_file(tmp_path, "resnet20", 10)
    summary = distill(
        _cfg(
            tmp_path,
            "model.name=resnet20",
            "teacher.name=resnet20",
            f"teacher.pretrained={file}",
            f"data.cache_dir={tmp_path / 'cache'}",  # keep the fake 99% out of other tests
            "train.epochs=2",
        )
    )
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: teacher 0")]
    assert len(warnings) == 1 and "data.augment" in warnings[0], out  # once per run
    rows = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(r)["train_teacher_top1"] < 84.0 for r in rows)
