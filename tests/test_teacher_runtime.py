"""teacher.runtime: the teacher's forward pass through PyTorch, channels_last or onnxruntime
gives the same logits, trains the student, is timed for auto and recorded for a resume."""

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from conftest import timm_weights
from safetensors.torch import load_file

import tlkd.models  # noqa: F401  registers the CIFAR models
from tlkd.config import load_config
from tlkd.distill.teacher import Teacher
from tlkd.errors import ConfigError
from tlkd.recipes.distill import distill

pytest.importorskip("onnxruntime")

SMALL = [
    "data.dataset=digits", "data.image_size=16", "data.samples_per_class=6",
    "data.num_workers=0", "train.batch_size=12", "train.epochs=1", "train.log_every=1000",
    "train.precision=fp32", "train.channels_last=false", "model.name=resnet20",
    "teacher.name=resnet20",
]  # fmt: skip


def _teacher(tmp_path: Path) -> Path:
    return timm_weights(tmp_path / "teacher.safetensors", "resnet20", 10)


def test_every_runtime_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10).eval()
    x = torch.randn(6, 3, 16, 16)
    student = torch.nn.Linear(3 * 16 * 16, 10)
    out = {}
    for runtime in ("torch", "channels_last", "onnxruntime"):
        teacher = Teacher(model, None, "resnet20", False, (0.5,) * 3, (0.25,) * 3)
        teacher.set_runtime(runtime, torch.zeros(4, 3, 16, 16))  # another batch size
        logits, feats = teacher(x)
        assert feats == [] and not logits.is_inference() and not logits.requires_grad
        # the teacher's logits as a kd target: the student's gradient is computed from them
        student.zero_grad()
        s = student(x.flatten(1))
        F.kl_div(F.log_softmax(s, 1), F.softmax(logits, 1), reduction="batchmean").backward()
        out[runtime] = (logits, student.weight.grad.clone())
    ref_logits, ref_grad = out["torch"]
    for runtime, (logits, grad) in out.items():
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4, msg=runtime)
        torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4, msg=runtime)


def test_onnxruntime_teacher_trains_and_auto_is_timed_and_recorded(tmp_path):
    file = _teacher(tmp_path)
    base = [
        f"output_dir={tmp_path / 'runs'}", *SMALL, f"teacher.pretrained={file}",
        f"data.cache_dir={tmp_path / 'cache'}",  # nothing remembered from other tests
    ]  # fmt: skip
    summary = distill(load_config(None, [*base, "teacher.runtime=onnxruntime", "experiment=ort"]))
    assert summary["status"] == "finished" and summary["final_val_top1"] is not None
    saved = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    assert saved["resolved"]["teacher.runtime"] == "onnxruntime"
    # auto: every candidate timed (the plan names them), the choice recorded for a resume
    lines = []
    from tlkd.engine.progress import Reporter

    reporter = Reporter(1000)
    reporter.print = lines.append
    auto = distill(load_config(None, [*base, "experiment=auto"]), reporter=reporter)
    shown = next(x for x in lines if x.startswith("teacher 0   runtime"))
    assert all(name in shown for name in ("torch", "channels_last", "onnxruntime")), shown
    saved = yaml.safe_load((Path(auto["run_dir"]) / "config.yaml").read_text())
    assert saved["teacher"]["runtime"] == "auto"
    assert saved["resolved"]["teacher.runtime"] in ("torch", "channels_last", "onnxruntime")
    assert json.loads((Path(auto["run_dir"]) / "summary.json").read_text())["status"] == "finished"
    # a second run finds the choice remembered and measures nothing: the same student, so
    # measuring left the random numbers drawn afterwards alone
    lines.clear()
    again = distill(load_config(None, [*base, "experiment=again"]), reporter=reporter)
    assert "measured before" in next(x for x in lines if x.startswith("teacher 0   runtime"))
    a = load_file(Path(auto["run_dir"]) / "model.safetensors")
    b = load_file(Path(again["run_dir"]) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_onnxruntime_refuses_feature_teachers(tmp_path):
    file = _teacher(tmp_path)
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'runs'}", *SMALL, f"teacher.pretrained={file}",
        "teacher.runtime=onnxruntime", "distill.losses=[{type: fitnet}, {type: ce}]",
    ])  # fmt: skip
    with pytest.raises(ConfigError, match="teacher.runtime: onnxruntime serves logits only"):
        distill(cfg, dry_run=True)


def test_timing_leaves_the_global_random_numbers_alone():
    """A run that times its candidates must continue like one that remembers the choice:
    neither teacher.runtime's nor precision/channels_last's timing moves the global RNG (the
    timed training steps run dropout; the timing batch is random)."""
    from tlkd.distill import runtime as rt
    from tlkd.engine import tune

    model = timm.create_model("resnet20", num_classes=10, drop_rate=0.5)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    rt.choose(model.eval(), ["torch", "channels_last"], (4, 3, 16, 16), None, None, "cpu")
    assert torch.equal(torch.get_rng_state(), state)
    chosen = tune.choose(
        "fp32", "auto", model.train(), torch.device("cpu"), (4, 3, 16, 16), True,
        lambda m: None, None,
    )  # fmt: skip
    assert chosen[0] == "fp32" and torch.equal(torch.get_rng_state(), state)


def test_resume_may_change_the_runtime_and_survives_onnxruntime_going_missing(
    tmp_path, monkeypatch, cli
):
    """A run whose first start chose onnxruntime resumes where onnxruntime is gone (timed
    again, no error), and a resume may set another runtime (the same computation)."""
    from tlkd.distill import runtime as rt

    file = _teacher(tmp_path)
    over = [
        f"output_dir={tmp_path / 'runs'}", *SMALL, f"teacher.pretrained={file}",
        "experiment=first", "teacher.runtime=onnxruntime",
    ]  # fmt: skip
    first = distill(load_config(None, over))
    run = Path(first["run_dir"])
    # as if the first start's auto had chosen onnxruntime: config says auto, resolved says ort
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["teacher"]["runtime"] = "auto"
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    monkeypatch.setattr(rt, "onnxruntime_available", lambda: False)
    result = cli("distill", "--resume", run, "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert "runtime torch" in result.output or "runtime channels_last" in result.output
    result = cli("distill", "--resume", run, "train.epochs=3", "teacher.runtime=torch")
    assert result.exit_code == 0, result.output
    assert "runtime torch (teacher.runtime)" in result.output


def test_a_teacher_onnxruntime_cannot_run_is_one_clear_error(tmp_path, monkeypatch, cli):
    from tlkd.distill import runtime as rt

    def broken(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX is not supported\nmore")

    monkeypatch.setattr(rt.OrtForward, "__init__", broken)
    file = _teacher(tmp_path)
    config = tmp_path / "ort.yaml"
    config.write_text("experiment: ort\n")
    result = cli(
        "distill", config, f"output_dir={tmp_path / 'runs'}", *SMALL,
        f"teacher.pretrained={file}", "teacher.runtime=onnxruntime",
    )  # fmt: skip
    assert result.exit_code == 2
    assert (
        "error: teacher.runtime: could not run this teacher as onnxruntime: Exporting the "
        "operator 'aten::weird' to ONNX is not supported"
    ) in result.output
