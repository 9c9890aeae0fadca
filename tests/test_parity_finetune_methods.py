"""Fine-tuning methods that use the starting weights: L2-SP (Li et al. 2018), LP-FT (Kumar et
al. 2022) and WiSE-FT (Wortsman et al. 2022, ``tlkd wise``). The parity tests compare with
independent transcriptions of the references' formulas: the L2-SP authors' official code
(holyseven/TransferLearningClassification, ``model/network_base.py``, ``_decay`` mode 1) and
tllib's ``SPRegularization`` (``tllib/regularization/delta.py``); the WiSE-FT merge of
mlfoundations/wise-ft (``src/wise_ft.py``, ``_merge`` without Fisher weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from conftest import MODEL, error_line, small_config, write_images
from safetensors.torch import load_file, save_file

from tlkd.config.loader import validate
from tlkd.engine.l2sp import L2SP
from tlkd.engine.objectives import Classification
from tlkd.engine.progress import Reporter
from tlkd.engine.trainer import Interrupted, Trainer
from tlkd.errors import ConfigError
from tlkd.recipes.evaluate import evaluate
from tlkd.recipes.finetune import finetune
from tlkd.recipes.wise import interpolate, wise
from tlkd.run.rundir import RunDir

LEARNED = ("train_loss", "train_loss_l2sp", "train_top1", "val_loss", "val_top1", "lr")


def pretrained_file(path: Path, seed: int = 7) -> Path:
    """Weights of the tiny model trained elsewhere (here: random, seeded) for 5 classes, so
    a 3-class run keeps the backbone and gets a new head."""
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=5)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_config(root: Path, train: Path, val: Path, pretrained: Path, **train_keys) -> dict:
    return small_config(
        root,
        train,
        val,
        model={"name": MODEL, "pretrained": str(pretrained)},
        train={"epochs": 3, **train_keys},
    )


def quiet_finetune(raw: dict, resume: Path | None = None) -> dict:
    return finetune(validate(raw), reporter=Reporter(quiet=True), resume=resume)


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def is_head(name: str) -> bool:
    return name.startswith("fc.")


# --- L2-SP: the penalty against the references' formulas ---------------------------------------


def official_l2sp(model, ckpt, alpha, beta, new_layers=("fc.",)):
    """The official code's ``_decay`` mode 1 in PyTorch terms: TF-slim's ``weights`` variables
    (convolution and fully-connected kernels; BatchNorm's scale is ``gamma``, biases are
    ``biases``), ``tf.nn.l2_loss(v - pretrained)`` for existing layers, ``tf.nn.l2_loss(v)``
    for new ones, ``wd_rate * add_n(existing) + wd_rate2 * add_n(new)``."""

    def l2_loss(t):  # tf.nn.l2_loss: sum(t ** 2) / 2
        return torch.sum(t**2) / 2

    existing, new = [], []
    for name, v in model.named_parameters():
        if not (name.endswith(".weight") and v.dim() > 1):
            continue
        if any(n in name for n in new_layers):
            new.append(l2_loss(v))
        else:
            existing.append(l2_loss(v - ckpt[name]))
    add_n = lambda ts: torch.stack(ts).sum() if ts else torch.zeros(())  # noqa: E731
    return alpha * add_n(existing) + beta * add_n(new)


def tllib_l2sp(model, source, alpha, beta):
    """tllib's SPRegularization and L2Regularization (0.5 * ||w - w0||^2 and 0.5 * ||w||^2 per
    parameter, summed) over the same weight tensors, times its trade-offs."""
    sp = head = 0.0
    for name, p in model.named_parameters():
        if not (name.endswith(".weight") and p.dim() > 1):
            continue
        if is_head(name):
            head += 0.5 * torch.norm(p) ** 2
        else:
            sp += 0.5 * torch.norm(p - source[name]) ** 2
    return alpha * sp, beta * head


def moved_model(seed: int = 3):
    """The tiny model at its start (``start``) and moved away from it (the model)."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=3)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, start


def grads(model) -> dict[str, torch.Tensor | None]:
    out = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def test_l2sp_parity_value_and_gradient_with_the_official_code_and_tllib():
    model, start = moved_model()
    alpha, beta = 0.3, 0.07
    reg = L2SP(Classification(), model, start, alpha, beta, head_is_new=True)
    sp, head = reg.penalty(model)
    (sp + head).backward()
    ours = grads(model)
    official = official_l2sp(model, start, alpha, beta)
    official.backward()
    theirs = grads(model)
    assert (sp + head).item() == pytest.approx(official.item(), rel=1e-6)
    t_sp, t_head = tllib_l2sp(model, start, alpha, beta)
    # the norm, then its square: float32 rounding differs slightly
    assert sp.item() == pytest.approx(t_sp.item(), rel=1e-5)
    assert head.item() == pytest.approx(t_head.item(), rel=1e-5)
    assert sp.item() > 0 and head.item() > 0
    params = dict(model.named_parameters())
    weights = [n for n, p in params.items() if n.endswith(".weight") and p.dim() > 1]
    assert len(weights) > 10 and "fc.weight" in weights
    for name, p in params.items():
        if name in weights:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-9)
            # the gradient: alpha * (w - w0) toward the start, beta * w on the new head
            want = beta * p.detach() if is_head(name) else alpha * (p.detach() - start[name])
            torch.testing.assert_close(ours[name], want, rtol=1e-5, atol=1e-9)
        else:  # biases, BatchNorm scales and shifts: not regularised (no weight decay either)
            assert ours[name] is None and theirs[name] is None, name


def test_l2sp_parity_a_loaded_head_is_pulled_toward_its_start():
    model, start = moved_model()
    reg = L2SP(Classification(), model, start, 0.5, 0.01, head_is_new=False)
    sp, head = reg.penalty(model)
    assert head.item() == 0
    want = official_l2sp(model, start, 0.5, 0.0, new_layers=())
    assert sp.item() == pytest.approx(want.item(), rel=1e-6)


def test_l2sp_parity_penalty_is_zero_at_the_start_and_logged_with_the_loss():
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=3)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reg = L2SP(Classification(), model, start, 1.0, 0.0, head_is_new=True)
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    out = reg(model, images, targets)
    assert out.parts["l2sp"].item() == 0 and out.parts["l2sp_head"].item() == 0
    assert out.loss.item() == pytest.approx(out.parts["ce"].item())


# --- L2-SP, LP-FT: configs, plans, runs --------------------------------------------------------


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": {"l2sp": 0.1, "optimizer": {"weight_decay": 0.05}}}, "replaces weight decay"),
        ({"train": {"l2sp_beta": 0.1}}, "set train.l2sp too"),
        ({"train": {"lp_epochs": 3, "epochs": 3}}, "must be below train.epochs"),
        ({"train": {"lp_epochs": 1}, "model": {"freeze": "backbone"}}, "drop model.freeze"),
        ({"train": {"l2sp": 0.1}, "teacher": {"name": MODEL}}, "finetune method"),
    ],
)
def test_l2sp_and_lp_epochs_config_errors(sections, message):
    with pytest.raises(ConfigError, match=message):
        validate(sections)


def test_l2sp_and_lpft_dry_run_plans_and_need_pretrained_weights(tmp_path, tiny_config, run_cli):
    weights = pretrained_file(tmp_path / "pre.safetensors")
    cfg = tiny_config(
        model={"pretrained": str(weights)},
        train={"epochs": 3, "lp_epochs": 1, "l2sp": 0.1, "optimizer": {"weight_decay": None}},
    )
    proc = run_cli("finetune", cfg, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "lp-ft       epochs 1-1: the head alone" in proc.stdout
    assert "epochs 2-3: every layer" in proc.stdout
    assert "l2sp        alpha 0.1" in proc.stdout and "beta 0.01" in proc.stdout
    assert "weight_decay: 0 (train.l2sp replaces weight decay" in proc.stdout
    assert "(freeze: backbone, unfreeze after epoch 1 (LP-FT))" in proc.stdout
    random_start = tiny_config("random.yaml", train={"l2sp": 0.1})
    proc = run_cli("finetune", random_start, "--dry-run")
    assert proc.returncode == 2
    assert "train.l2sp: L2-SP starts from pretrained weights" in error_line(proc)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lpft_only_the_head_trains_during_lp_then_every_layer(tmp_path, squares, monkeypatch):
    starts = []
    fit = Trainer.fit
    monkeypatch.setattr(
        Trainer,
        "fit",
        lambda self, *a, **k: starts.append(snapshot(self.model)) or fit(self, *a, **k),
    )
    # keep both checkpoints (a finished run drops checkpoint.prev.pt): they are the snapshots
    monkeypatch.setattr(RunDir, "finish_checkpoints", lambda self, keep: None)
    weights = pretrained_file(tmp_path / "pre.safetensors")
    summary = quiet_finetune(run_config(tmp_path, *squares, weights, lp_epochs=2))
    run = Path(summary["run_dir"])
    ckpt = {
        n: torch.load(run / n, weights_only=True) for n in ("checkpoint.prev.pt", "checkpoint.pt")
    }
    assert ckpt["checkpoint.prev.pt"]["epoch"] == 2 and ckpt["checkpoint.pt"]["epoch"] == 3
    start, lp, ft = starts[0], ckpt["checkpoint.prev.pt"]["model"], ckpt["checkpoint.pt"]["model"]
    backbone = [k for k in start if not is_head(k)]
    params = [n for n, _ in timm.create_model(MODEL, num_classes=3).named_parameters()]
    # LP: the backbone bit-identical (weights, BatchNorm statistics and counters), the head moved
    assert [k for k in backbone if not torch.equal(start[k], lp[k])] == []
    assert all(not torch.equal(start[k], lp[k]) for k in ("fc.weight", "fc.bias"))
    # FT: every parameter and BatchNorm statistic moves
    moved = [k for k in params if not torch.equal(lp[k], ft[k])]
    assert moved == params
    assert not torch.equal(lp["bn1.running_mean"], ft["bn1.running_mean"])
    # the run keeps its start: the pretrained backbone and the new head as initialised
    kept = load_file(run / "start.safetensors")
    pre = load_file(weights)
    assert all(torch.equal(kept[k], pre[k]) for k in backbone)
    assert torch.equal(kept["fc.weight"], start["fc.weight"])
    assert summary["start_weights"] == "start.safetensors" and summary["lp_epochs"] == 2


def test_l2sp_run_logs_the_penalty_and_drops_weight_decay(tmp_path, squares):
    weights = pretrained_file(tmp_path / "pre.safetensors")
    raw = run_config(tmp_path, *squares, weights, epochs=2, l2sp=0.5, l2sp_beta=0.1)
    raw["train"]["optimizer"]["weight_decay"] = None
    summary = quiet_finetune(raw)
    run = Path(summary["run_dir"])
    for row in rows(run):
        assert row["train_loss_l2sp"] > 0 and row["train_loss_l2sp_head"] > 0
        parts = row["train_loss_ce"] + row["train_loss_l2sp"] + row["train_loss_l2sp_head"]
        assert row["train_loss"] == pytest.approx(parts, rel=1e-5)
    assert summary["resolved"]["train.optimizer.weight_decay"] == 0
    # the last logged penalty is about that of the final weights (it is an epoch mean)
    final = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    start = load_file(run / "start.safetensors")
    sp = sum(
        0.5 * 0.5 * (final[k] - start[k]).pow(2).sum().item()
        for k in final
        if not is_head(k) and k.endswith(".weight") and final[k].dim() > 1
    )
    assert rows(run)[-1]["train_loss_l2sp"] == pytest.approx(sp, rel=0.5)


@pytest.mark.parametrize("stop_epoch", [1, 2])
def test_lpft_with_l2sp_resumes_exactly_across_the_switch(tmp_path, monkeypatch, stop_epoch):
    """Stopped in the linear-probing epoch (the resumed run makes the switch) or in the first
    fine-tuning epoch; the pretrained file changes before the resume, which must not matter
    (L2-SP's w0 comes from the run's start.safetensors)."""
    train = write_images(tmp_path / "train", per_class=8, seed=11)
    val = write_images(tmp_path / "val", per_class=4, seed=12)
    weights = pretrained_file(tmp_path / "pre.safetensors")
    make = lambda name: {  # noqa: E731
        **run_config(tmp_path, train, val, weights, lp_epochs=1, l2sp=0.2),
        "experiment": name,
    }
    full = Path(quiet_finetune(make("full"))["run_dir"])

    seen: dict = {}
    train_epoch = Trainer.train_epoch

    def spy_epoch(self, epoch):
        seen.update(trainer=self, epoch=epoch)
        return train_epoch(self, epoch)

    step = Reporter.step

    def stop_at(self, n, *args):
        step(self, n, *args)
        if seen["epoch"] == stop_epoch and n == 2 and not seen.get("stopped"):
            seen["stopped"] = True
            seen["trainer"]._signals.received = "SIGTERM"

    monkeypatch.setattr(Trainer, "train_epoch", spy_epoch)
    monkeypatch.setattr(Reporter, "step", stop_at)
    with pytest.raises(Interrupted):
        quiet_finetune(make("cut"))
    cut = tmp_path / "runs" / "cut"
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["partial"]["epoch"] == stop_epoch
    pretrained_file(weights, seed=99)  # another pretrained file under the same name
    quiet_finetune(make("cut"), resume=cut)
    assert [{k: r[k] for k in LEARNED} for r in rows(cut)] == [
        {k: r[k] for k in LEARNED} for r in rows(full)
    ]
    a, b = load_file(cut / "model.safetensors"), load_file(full / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- WiSE-FT ------------------------------------------------------------------------------------


def test_wise_parity_interpolation_of_every_tensor():
    torch.manual_seed(1)
    theta0 = timm.create_model(MODEL, num_classes=3).state_dict()
    theta1 = {
        k: (v + torch.randn_like(v) if v.is_floating_point() else v + 5) for k, v in theta0.items()
    }
    head = {"fc.weight", "fc.bias"}
    for alpha in (0.0, 0.3, 0.5, 1.0):
        merged = interpolate(theta0, theta1, alpha, keep=head)
        assert merged.keys() == theta0.keys()
        for k, t0 in theta0.items():
            t1 = theta1[k]
            if k in head or not t0.is_floating_point():  # the fine-tuned head; counters
                assert torch.equal(merged[k], t1), k
            else:  # the official merge, bit for bit
                assert torch.equal(merged[k], (1 - alpha) * t0 + alpha * t1), k
                if alpha in (0.0, 1.0):
                    assert torch.equal(merged[k], t1 if alpha else t0), k
    # with a loaded head (keep empty) the head is interpolated too
    merged = interpolate(theta0, theta1, 0.25)
    assert torch.equal(merged["fc.weight"], 0.75 * theta0["fc.weight"] + 0.25 * theta1["fc.weight"])


DEIT = "deit_tiny_distilled_patch16_224"
DEIT_KWARGS = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2}
DEIT_HEADS = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}


def test_l2sp_and_wise_treat_both_heads_of_a_distilled_deit_as_the_head():
    """A distilled DeiT has two classifiers (head, head_dist): a new head is both, under plain
    L2 in L2-SP (not pulled toward a random start) and kept fine-tuned by WiSE-FT."""
    from tlkd.engine.l2sp import l2sp_names
    from tlkd.recipes.wise import head_keys

    torch.manual_seed(0)
    model = timm.create_model(DEIT, num_classes=3, **DEIT_KWARGS)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    toward, new_head = l2sp_names(model, start, head_is_new=True)
    assert sorted(new_head) == ["head.weight", "head_dist.weight"]  # weights: 2-d tensors
    assert not DEIT_HEADS & set(toward) and "blocks.0.attn.qkv.weight" in toward
    toward, new_head = l2sp_names(model, start, head_is_new=False)  # a loaded head
    assert new_head == [] and {"head.weight", "head_dist.weight"} <= set(toward)
    reg = L2SP(Classification(), model, start, 0.1, 0.01, head_is_new=True)
    assert reg.counts(model)[1] == 2 * 24 * 3
    keep = head_keys(model, start)
    assert keep == DEIT_HEADS
    theta1 = {k: v + 1.0 if v.is_floating_point() else v for k, v in start.items()}
    merged = interpolate(start, theta1, 0.5, keep)
    assert all(torch.equal(merged[k], theta1[k]) for k in DEIT_HEADS)
    torch.testing.assert_close(merged["cls_token"], start["cls_token"] + 0.5)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    """A finished 2-epoch fine-tuning of the tiny model from pretrained weights (new head)."""
    root = tmp_path_factory.mktemp("wise")
    train = write_images(root / "train", per_class=8, seed=21)
    val = write_images(root / "val", per_class=4, seed=22)
    weights = pretrained_file(root / "pre.safetensors")
    raw = {**run_config(root, train, val, weights, epochs=2), "experiment": "ft"}
    raw["train"]["optimizer"]["lr"] = 0.05  # move far enough from the start to matter
    return Path(quiet_finetune(raw)["run_dir"])


def endpoint(run: Path, where: Path, state: dict[str, torch.Tensor]) -> Path:
    """A copy of ``run`` whose model.safetensors is ``state`` (for tlkd evaluate)."""
    where.mkdir()
    for name in ("config.yaml", "summary.json"):
        shutil.copy(run / name, where / name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(where / "model.safetensors"))
    return where


def test_wise_parity_alpha_0_and_1_reproduce_the_endpoints_evaluate_top1(pretrained_run, tmp_path):
    summary = wise(pretrained_run, [0, 1], Reporter(quiet=True))
    by_alpha = {r["alpha"]: r for r in summary["wise"]["alphas"]}
    theta1 = torch.load(pretrained_run / "checkpoint.pt", weights_only=True)["model"]
    start = load_file(pretrained_run / "start.safetensors")
    # theta0 with the fine-tuned head (the start's head was new) and theta1's counters
    theta0 = {
        k: theta1[k] if is_head(k) or not v.is_floating_point() else v for k, v in start.items()
    }
    for alpha, state in ((0, theta0), (1, theta1)):
        ev = evaluate(endpoint(pretrained_run, tmp_path / f"a{alpha}", state), speed=False,
                      reporter=Reporter(quiet=True))  # fmt: skip
        assert by_alpha[alpha]["val_top1"] == ev["top1"]
        assert by_alpha[alpha]["val_loss"] == pytest.approx(ev["loss"], rel=1e-6)
    assert by_alpha[0]["val_loss"] != pytest.approx(by_alpha[1]["val_loss"])
    assert summary["wise"]["theta0"] == "start.safetensors"
    assert summary["wise"]["head"].startswith("fine-tuned")


def test_wise_cli_writes_a_run_dir_that_plain_timm_loads(pretrained_run, run_cli, tmp_path):
    proc = run_cli("wise", pretrained_run, "--alpha", "0", "0.5", "1")
    assert proc.returncode == 0, proc.stderr
    assert "WiSE-FT of ft" in proc.stdout and "best alpha" in proc.stdout
    out = Path(proc.stdout.split(": wrote ")[1].split()[0])
    assert out.parent == pretrained_run.parent and out.name.startswith("ft-wise")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "wise" and summary["run_dir"] == str(out)
    assert [r["alpha"] for r in summary["wise"]["alphas"]] == [0, 0.5, 1]
    alpha = summary["wise"]["alpha"]
    best = max(summary["wise"]["alphas"], key=lambda r: (r["val_top1"], -r["val_loss"]))
    assert alpha == best["alpha"] and summary["best_val_top1"] == best["val_top1"]
    theta1 = torch.load(pretrained_run / "checkpoint.pt", weights_only=True)["model"]
    start = load_file(pretrained_run / "start.safetensors")
    want = interpolate(start, theta1, alpha, keep={"fc.weight", "fc.bias"})
    model = timm.create_model(
        MODEL, pretrained=True, num_classes=3,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=3),
    )  # fmt: skip
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # a run directory like the others: tlkd evaluate scores it as wise did
    proc = run_cli("evaluate", out, "--no-speed", "-q")
    assert proc.returncode == 0, proc.stderr
    assert f"top-1 {summary['best_val_top1']:.2f}%" in proc.stdout
    # quiet: one line; a second run gets its own folder
    proc = run_cli("wise", pretrained_run, "-a", "0.5", "-q")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "alpha 0.5  val top-1" in line and line.split()[0] != str(out)
    assert Path(line.split()[0]).name.startswith("ft-wise-")


def test_wise_recreates_the_start_of_a_run_without_start_safetensors(pretrained_run, tmp_path):
    copy = tmp_path / "older"
    shutil.copytree(pretrained_run, copy)
    (copy / "start.safetensors").unlink()
    summary = wise(copy, [0, 0.5], Reporter(quiet=True))
    assert summary["wise"]["theta0"].startswith("re-created from model.pretrained")
    original = wise(pretrained_run, [0, 0.5], Reporter(quiet=True))
    assert summary["wise"]["alphas"] == original["wise"]["alphas"]


def test_wise_cli_errors_exit_2(pretrained_run, trained_run, run_cli, tmp_path):
    proc = run_cli("wise", pretrained_run, "--alpha", "1.5")
    assert proc.returncode == 2 and "--alpha: 1.5 is outside [0, 1]" in error_line(proc)
    proc = run_cli("wise", tmp_path)
    assert proc.returncode == 2 and "not a tlkd run directory" in error_line(proc)
    proc = run_cli("wise", trained_run.dir)  # trained from random weights
    assert proc.returncode == 2 and "started from random weights" in error_line(proc)
    proc = run_cli("wise", pretrained_run, "--alpha", "x")
    assert proc.returncode == 2
    swept = tmp_path / "swept"  # a sweep's run: the final weights are gone
    shutil.copytree(pretrained_run, swept)
    (swept / "checkpoint.pt").unlink()
    proc = run_cli("wise", swept)
    assert proc.returncode == 2 and "kept no checkpoint.pt" in error_line(proc)
