"""DeiT token distillation and function matching (Beyer et al. 2022)."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import error_line
from safetensors.torch import load_file, save_file

import tlkd.models  # noqa: F401  registers the CIFAR models
from tlkd.config import load_config
from tlkd.distill.losses.token import token_loss
from tlkd.distill.mixing import BatchMix
from tlkd.engine.progress import Reporter
from tlkd.recipes.distill import distill
from tlkd.recipes.evaluate import evaluate

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
# a tiny DeiT with a distillation token at 16 px: 4x4 patches, one block
TINY_DEIT = [
    "model.name=deit_tiny_distilled_patch16_224",
    "model.kwargs.img_size=16",
    "model.kwargs.patch_size=4",
    "model.kwargs.depth=1",
    "model.kwargs.embed_dim=24",
    "model.kwargs.num_heads=2",
]


def _teacher_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _cfg(tmp_path: Path, *overrides: str):
    file = _teacher_file(tmp_path)
    return load_config(
        None,
        [
            f"output_dir={tmp_path / 'runs'}",
            *SMALL,
            "teacher.name=resnet20",
            f"teacher.pretrained={file}",
            *overrides,
        ],
    )


# --- DeiT token distillation ---------------------------------------------------------------


def _ref_deit_loss(outputs, outputs_kd, labels, teacher, kind, alpha, tau):
    """Written from facebookresearch/deit losses.py (DistillationLoss.forward): the base
    criterion on the class head, then for 'soft' the KL of the distillation head to the
    teacher at temperature tau with reduction 'sum' divided by outputs_kd.numel(), times
    tau^2; for 'hard' the cross-entropy with the teacher's argmax; mixed as
    base * (1 - alpha) + distillation * alpha."""
    base = F.cross_entropy(outputs, labels)
    if kind == "soft":
        kl = F.kl_div(
            F.log_softmax(outputs_kd / tau, dim=1),
            F.log_softmax(teacher / tau, dim=1),
            reduction="sum",
            log_target=True,
        )
        distillation = kl * (tau * tau) / outputs_kd.numel()
    else:
        distillation = F.cross_entropy(outputs_kd, teacher.argmax(dim=1))
    return base * (1 - alpha) + distillation * alpha


@pytest.mark.parametrize("kind,tau", [("hard", 1.0), ("soft", 1.0), ("soft", 3.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_parity_with_deit(kind, tau, dtype):
    """ce x (1 - alpha) on the class head + token x alpha on the distillation head is DeiT's
    DistillationLoss (facebookresearch/deit losses.py): value and gradients of both heads."""
    g = torch.Generator().manual_seed(0)
    cls = (3 * torch.randn(16, 10, generator=g, dtype=dtype)).requires_grad_()
    dist = (3 * torch.randn(16, 10, generator=g, dtype=dtype)).requires_grad_()
    teacher = 3 * torch.randn(16, 10, generator=g, dtype=dtype)
    labels = torch.randint(0, 10, (16,), generator=g)
    alpha = 0.5
    ours = F.cross_entropy(cls, labels) * (1 - alpha) + alpha * token_loss(dist, teacher, kind, tau)
    ref = _ref_deit_loss(cls, dist, labels, teacher, kind, alpha, tau)
    ours_g = torch.autograd.grad(ours, (cls, dist))
    ref_g = torch.autograd.grad(ref, (cls, dist))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    for a, b in zip(ours_g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_token_distillation_trains_the_distillation_head_and_predicts_with_both(tmp_path):
    cfg = _cfg(
        tmp_path,
        *TINY_DEIT,
        "experiment=token",
        "distill.losses=[{type: ce, weight: 0.5}, {type: token, weight: 0.5}]",
    )
    out = distill(cfg)
    run = Path(out["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss_token"] > 0 and rows[-1]["train_loss_ce"] > 0
    # the saved weights load into plain timm; eval mode averages the two heads, so
    # evaluate gives the val top-1 of training's last epoch
    report = evaluate(run, reporter=Reporter(quiet=True), speed=False)
    assert report["top1"] == pytest.approx(out["final_val_top1"], abs=1e-4)
    model = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        num_classes=10,
        img_size=16,
        patch_size=4,
        depth=1,
        embed_dim=24,
        num_heads=2,
        pretrained=True,
        # num_classes in the overlay too: else timm re-initialises both heads (not 1000 classes)
        pretrained_cfg_overlay={"file": str(run / "model.safetensors"), "num_classes": 10},
    ).eval()
    saved = load_file(run / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 16, 16)
    cls, dist = model.forward_features(x)[:, 0], model.forward_features(x)[:, 1]
    averaged = (model.head(cls) + model.head_dist(dist)) / 2
    torch.testing.assert_close(model(x), averaged)
    # the exported file predicts with the mean of both heads too (one output, 10 classes)
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from tlkd.recipes.export import export

    report = export(run, "onnx")
    assert report["verified"]
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), averaged, rtol=1e-4, atol=1e-4)


def test_token_distillation_with_the_teacher_cache(tmp_path):
    """distill.cache serves token: the distillation head learns the stored logits of the
    view it is shown, as it would the live teacher's (the cache refuses feature losses only)."""
    cfg = _cfg(
        tmp_path,
        *TINY_DEIT,
        "experiment=token-cache",
        f"data.cache_dir={tmp_path / 'cache'}",
        "distill.cache.views=1",
        "distill.losses=[{type: ce, weight: 0.5}, {type: token, weight: 0.5, mode: soft}]",
    )
    out = distill(cfg)
    assert out["status"] == "finished" and out["teacher_cache"]["views"] == 1
    run = Path(out["run_dir"])
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["train_loss_token"] > 0


def test_token_needs_both_heads_in_the_step():
    """Like DeiT's DistillationLoss: a student that returns one output to a token loss (not
    in train mode, say) is an error, not the class head silently read as the distillation
    head."""
    from tlkd.config.schema import LossConfig
    from tlkd.distill.objective import Distillation
    from tlkd.distill.teacher import Teacher
    from tlkd.errors import TlkdError

    torch.manual_seed(0)
    kwargs = dict(img_size=16, patch_size=4, depth=1, embed_dim=24, num_heads=2)
    student = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, **kwargs)
    teacher = Teacher(
        timm.create_model("resnet20", num_classes=10), None, "t", False, (0.5,) * 3, (0.5,) * 3
    )
    objective = Distillation(
        student, [teacher], [LossConfig(type="ce"), LossConfig(type="token")],
        [str(i) for i in range(10)], None, [1.0], 16, torch.device("cpu"),
    )  # fmt: skip
    images, targets = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    student.train()
    cls, dist = student(images)
    out = objective(student, images, targets)
    assert set(out.parts) == {"ce", "token"}
    torch.testing.assert_close(out.logits, (cls + dist) / 2)  # train_top1: DeiT's prediction

    def head_grads(ce_weight, token_weight):
        for i, weight in enumerate((ce_weight, token_weight)):
            objective.losses[i] = objective.losses[i].model_copy(update={"weight": weight})
        loss = objective(student, images, targets).loss
        heads = (student.head.weight, student.head_dist.weight)
        return [g.abs().sum().item() for g in torch.autograd.grad(loss, heads)]

    # routing: ce reads the class head only, token the distillation head only (as DeiT)
    g_head, g_dist = head_grads(1.0, 0.0)
    assert g_head > 0 and g_dist == 0
    g_head, g_dist = head_grads(0.0, 1.0)
    assert g_head == 0 and g_dist > 0
    with pytest.raises(TlkdError, match="two heads"):
        objective(student.eval(), images, targets)


def test_token_distillation_needs_a_distilled_student(tmp_path, run_cli):
    cfg = tmp_path / "cfg.yaml"
    file = _teacher_file(tmp_path)
    cfg.write_text(
        f"output_dir: {tmp_path / 'runs'}\n"
        "data: {dataset: digits, image_size: 16, samples_per_class: 2, num_workers: 0}\n"
        "model: {name: resnet20}\n"
        f"teacher: {{name: resnet20, pretrained: {file}}}\n"
        "distill: {losses: [{type: ce}, {type: token, mode: soft}]}\n"
    )
    proc = run_cli("distill", cfg, "--dry-run")
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: distill.losses.1:") and "deit_tiny_distilled" in line


# --- function matching ---------------------------------------------------------------------


def _ref_big_vision_mixup(a: float, *things: np.ndarray) -> list[np.ndarray]:
    """google-research/big_vision, ``big_vision/utils.py`` ``get_mixup(rng, p)``, transcribed
    to numpy with its Beta draw ``a`` given: ``a = max(a, 1 - a)``, then every array mixed with
    itself rolled by one along the batch axis."""
    a = np.maximum(a, 1.0 - a)
    return [a * t + (1 - a) * np.roll(t, shift=1, axis=0) for t in things]


@pytest.mark.parametrize("seed", [0, 1, 2, 4])
def test_batch_mix_parity_with_big_vision_get_mixup(seed):
    """One coefficient per batch from Beta(alpha, alpha) with numpy's global RNG (timm's
    convention), then big_vision's mixup on the same draw. Seeds 0 and 1 draw a < 0.5: the
    image must still keep the larger share."""
    images = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    np.random.seed(seed)
    mixed = BatchMix(1.0, 0.0, 0.5)(images)
    np.random.seed(seed)
    a = np.random.beta(1.0, 1.0)
    (ref,) = _ref_big_vision_mixup(a, images.numpy())
    torch.testing.assert_close(mixed, torch.from_numpy(ref))
    assert (a < 0.5) == (seed in (0, 1))  # both branches of max(a, 1 - a) are exercised


def test_function_matching_kd_defaults_to_the_papers_temperature():
    """big_vision bit_i1k.py: ``kl`` at t=1; an explicit temperature is kept."""
    from tlkd.config.schema import DistillConfig

    fm = {"mixup_alpha": 1.0}
    assert DistillConfig(losses=[{"type": "kd"}], function_matching=fm).losses[0].temperature == 1
    kept = DistillConfig(losses=[{"type": "kd", "temperature": 4}], function_matching=fm)
    assert kept.losses[0].temperature == 4
    assert DistillConfig(losses=[{"type": "kd"}]).losses[0].temperature == 4
    # logit standardization keeps its authors' base temperature under function matching
    ls = DistillConfig(losses=[{"type": "kd", "standardize": True}], function_matching=fm)
    assert (ls.losses[0].temperature, ls.losses[0].weight) == (2, 9)


def test_batch_cutmix_pastes_the_neighbours_box():
    """CutMix (an option the reference does not have): timm's box, pasted from the image
    before (the batch rolled by one, as the mixup)."""
    images = torch.randn(6, 3, 8, 8)
    partner = torch.cat([images[-1:], images[:-1]])
    np.random.seed(1)
    cut = BatchMix(0.0, 1.0, 0.5)(images)
    changed = (cut != images).any(dim=1)  # (N, H, W): the pasted box
    assert changed.any() and not changed.all()
    box = changed.unsqueeze(1).expand_as(cut)
    assert torch.equal(cut[box], partner[box])


@pytest.mark.parametrize("rows", [2, 3, 5, 7])
def test_batch_mix_mixes_every_image_of_an_odd_batch(rows):
    """A batch reversed pairs its middle image with itself (timm's Mixup asserts an even
    batch for that reason); the last batch of an epoch, or a rank's share, may be odd."""
    images = torch.randn(rows, 3, 4, 4)
    np.random.seed(3)
    mixed = BatchMix(1.0, 0.0, 0.5)(images)
    assert all(not torch.allclose(m, x) for m, x in zip(mixed, images, strict=True))


def test_function_matching_shows_teacher_and_student_the_same_mixed_images(tmp_path):
    cfg = _cfg(
        tmp_path,
        "model.name=resnet20",
        "experiment=fm",
        "distill.losses=[{type: kd, temperature: 1.0}]",
        "distill.function_matching.mixup_alpha=1.0",
        "teacher.runtime=torch",  # the hooks below watch the PyTorch teacher
    )
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": [], "loader": []}
    real = distill.__globals__["Distillation"].forward

    def spy(self, model, images, targets):
        seen["loader"].append(images.clone())
        handles = [
            model.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].clone())),
            self.teachers[0].model.register_forward_pre_hook(
                lambda m, a: seen["teacher"].append(a[0].clone())
            ),
        ]
        try:
            return real(self, model, images, targets)
        finally:
            for h in handles:
                h.remove()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill.__globals__["Distillation"], "forward", spy)
        out = distill(cfg)
    assert out["status"] == "finished" and seen["student"]
    for s, t, x in zip(seen["student"], seen["teacher"], seen["loader"], strict=True):
        torch.testing.assert_close(s, t)  # the same (mixed) images; both normalised alike
        # and mixed: lam x + (1 - lam) x_prev, one lam per batch, not the loader's images
        partner = x.roll(1, dims=0)
        lam = ((s - partner) * (x - partner)).sum() / (x - partner).pow(2).sum()
        assert 0.0 < lam.item() < 1.0 and not torch.allclose(s, x)
        torch.testing.assert_close(s, lam * x + (1 - lam) * partner, atol=1e-5, rtol=1e-5)
    saved = (Path(out["run_dir"]) / "config.yaml").read_text()
    assert "function_matching" in saved


def test_function_matching_resumes_exactly(tmp_path, run_cli):
    """The mixing draws (numpy's global RNG, as timm) are in the checkpoint's RNG state: one
    epoch and ``--resume`` to two trains what two epochs straight train (mixup and CutMix,
    so the switch draws count too)."""
    file = _teacher_file(tmp_path)
    base = [
        f"output_dir={tmp_path / 'runs'}", *SMALL, "model.name=resnet20",
        "model.pretrained=false", "teacher.name=resnet20", f"teacher.pretrained={file}",
        "train.scheduler.name=none", "distill.losses=[{type: kd, temperature: 1.0}]",
        "distill.function_matching={mixup_alpha: 1.0, cutmix_alpha: 1.0, switch_prob: 0.5}",
    ]  # fmt: skip
    for name, epochs in (("full", 2), ("part", 1)):
        distill(load_config(None, [*base, f"experiment={name}", f"train.epochs={epochs}"]))
    runs = tmp_path / "runs"
    proc = run_cli("distill", "--resume", runs / "part", "train.epochs=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    def rows(name):
        lines = (runs / name / "metrics.jsonl").read_text().splitlines()
        keys = ("train_loss", "train_loss_kd", "val_loss", "val_top1")
        return [{k: json.loads(line)[k] for k in keys} for line in lines]

    assert len(rows("full")) == 2 and rows("part") == rows("full")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["distill.cache.views=2"], "remove distill.cache"),
        (["distill.losses=[{type: kd}, {type: ce}]"], "not 'ce'"),
        (["distill.losses=[{type: dkd}]"], "not 'dkd'"),
        (["distill.function_matching.mixup_alpha=0"], "mixup_alpha or cutmix_alpha"),
    ],
)
def test_function_matching_config_errors(tmp_path, overrides, message):
    from tlkd.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, ["distill.function_matching.mixup_alpha=1.0", *overrides])


def test_a_distilled_students_two_heads_are_both_classifiers(tmp_path):
    """freeze: backbone keeps head and head_dist trainable (else token trains nothing), and
    weights of another class count load with both heads left new."""
    from tlkd.models.factory import load_weights
    from tlkd.models.freeze import Freezer

    kwargs = dict(img_size=16, patch_size=4, depth=1, embed_dim=24, num_heads=2)
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, **kwargs)
    frozen = Freezer._prefixes(model, "backbone")
    assert "head" not in frozen and "head_dist" not in frozen and "blocks" in frozen
    other = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, **kwargs)
    file = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(file))
    load_weights(model, file)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, other.blocks[0].attn.qkv.weight)
    assert model.head_dist.weight.shape[0] == 10
