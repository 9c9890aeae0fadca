"""LoRA (``model.lora``, Hu et al. 2021) through peft. The parity tests compute each adapted
layer independently from its tensors, by the paper's formula with peft's conventions: ``h =
W x + b + (alpha / r) * B (A x)``, ``B`` zero at the start; for a Conv2d, ``A`` a convolution
with the layer's kernel and stride and ``B`` a 1x1 one. Merged weights: ``W + (alpha / r) B A``.
The model is a tiny timm ViT (one block of width 24 on 16 px images, 4x4 patches)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import error_line, small_config, write_images
from safetensors.torch import load_file, save_file

from tlkd.config.loader import load_config, validate
from tlkd.config.schema import LoraConfig, ModelConfig
from tlkd.engine.inference import classification_metrics, predict
from tlkd.engine.progress import Reporter
from tlkd.engine.trainer import Interrupted, Trainer
from tlkd.errors import ConfigError
from tlkd.models.factory import build_model
from tlkd.models.freeze import Freezer
from tlkd.models.lora import apply_lora, lora_targets, merged_checkpoint, merged_state_dict
from tlkd.recipes.build import build_experiment
from tlkd.recipes.evaluate import evaluate
from tlkd.recipes.export import load_run_model
from tlkd.recipes.finetune import finetune
from tlkd.recipes.wise import wise

VIT = "vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2}
ADAPTED = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


def lora_model(seed: int = 0, classes: int = 3, **lora) -> tuple[torch.nn.Module, ModelConfig]:
    """The tiny ViT with tlkd's adapters and freezing, as a finetune run builds it."""
    torch.manual_seed(seed)
    cfg = ModelConfig(name=VIT, pretrained=False, kwargs=VIT_KWARGS, lora=LoraConfig(**lora))
    model, _ = build_model(cfg, classes, None)
    apply_lora(model, cfg.lora)
    Freezer(model, cfg)
    return model, cfg


def train_step(model: torch.nn.Module, seed: int = 1, lr: float = 0.05) -> None:
    """One AdamW step on a random batch, over what requires gradients."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model.eval()


def layer_io(model: torch.nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The input and output of the layer ``name`` in a forward pass of ``x``."""
    seen = {}
    hook = model.get_submodule(name).register_forward_hook(
        lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach())
    )
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    return seen["x"], seen["y"], logits


def tensors(model: torch.nn.Module, name: str) -> tuple[torch.Tensor, ...]:
    """W, b, A, B of the adapted layer ``name``, read from the state dict."""
    s = model.state_dict()
    return (
        s[f"{name}.base_layer.weight"],
        s[f"{name}.base_layer.bias"],
        s[f"{name}.lora_A.default.weight"],
        s[f"{name}.lora_B.default.weight"],
    )


# --- parity with the formula --------------------------------------------------------------------


def test_lora_parity_linear_layers_after_a_training_step():
    rank, alpha = 4, 6.0
    model, _ = lora_model(rank=rank, alpha=alpha)
    scale = alpha / rank
    for name in ADAPTED:  # B starts at zero: the pretrained function
        assert not tensors(model, name)[3].any()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model)
    after = model.state_dict()
    for name in ADAPTED:
        w, b, a, bb = tensors(model, name)
        assert bb.abs().sum() > 0, name  # the adapters learned
        assert torch.equal(w, before[f"{name}.base_layer.weight"]), name  # W stays frozen
        assert a.shape == (rank, w.shape[1]) and bb.shape == (w.shape[0], rank)
        h, out, _ = layer_io(model, name, x)
        want = h @ w.T + b + scale * ((h @ a.T) @ bb.T)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == sorted(
        [f"{n}.lora_{ab}.default.weight" for n in ADAPTED for ab in "AB"]
        + ["head.weight", "head.bias"]
    )
    # merged: W + (alpha / r) B A under timm's names, a plain model computing the same
    merged = merged_state_dict(model)
    plain = timm.create_model(VIT, num_classes=3, **VIT_KWARGS)
    assert merged.keys() == plain.state_dict().keys()
    for name in ADAPTED:
        w, b, a, bb = tensors(model, name)
        torch.testing.assert_close(merged[f"{name}.weight"], w + scale * bb @ a)
        assert torch.equal(merged[f"{name}.bias"], b)
    assert torch.equal(merged["head.weight"], after["head.weight"])
    plain.load_state_dict(merged)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


def test_lora_parity_conv2d_layer_after_a_training_step():
    """A Conv2d target (the ViT's 4x4 patch embedding): A is a 4x4 stride-4 convolution to
    rank channels, B a 1x1 convolution back."""
    rank, alpha = 3, 3.0
    model, _ = lora_model(rank=rank, alpha=alpha, targets=["patch_embed.proj"])
    train_step(model)
    w, b, a, bb = tensors(model, "patch_embed.proj")
    assert bb.abs().sum() > 0 and a.shape == (rank, 3, 4, 4) and bb.shape == (24, rank, 1, 1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    h, out, _ = layer_io(model, "patch_embed.proj", x)
    want = F.conv2d(h, w, b, stride=4) + (alpha / rank) * F.conv2d(F.conv2d(h, a, stride=4), bb)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    merged = merged_state_dict(model)["patch_embed.proj.weight"]
    delta = (bb.flatten(1) @ a.flatten(1)).view_as(w)
    torch.testing.assert_close(merged, w + (alpha / rank) * delta)


def test_lora_trains_only_adapters_and_both_heads_of_a_distilled_deit():
    torch.manual_seed(0)
    kwargs = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 24, "num_heads": 2}
    cfg = ModelConfig(
        name="deit_tiny_distilled_patch16_224", pretrained=False, kwargs=kwargs, lora={}
    )
    model, _ = build_model(cfg, 3, None)
    report = apply_lora(model, cfg.lora)
    Freezer(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    adapters = {n for n in trainable if ".lora_" in n}
    assert trainable == heads | adapters
    assert len(report.modules) == 8 and len(adapters) == 16  # 2 blocks x 4 layers, A and B
    assert report.adapter_params == sum(model.get_parameter(n).numel() for n in adapters)
    assert report.rank == 8 and report.scale == 2.0  # the defaults: rank 8, alpha 16


# --- targets and config errors ------------------------------------------------------------------


def test_lora_targets_by_suffix_and_the_errors_name_the_key():
    torch.manual_seed(0)
    model = timm.create_model(VIT, num_classes=3, **VIT_KWARGS)
    assert lora_targets(model, None) == ADAPTED  # not patch_embed.proj, not head
    assert lora_targets(model, ["qkv", "blocks.0.mlp.fc2"]) == [ADAPTED[0], ADAPTED[3]]
    with pytest.raises(ConfigError, match=r"model\.lora\.targets: 'qvk' .*did you mean 'qkv'"):
        lora_targets(model, ["qkv", "qvk"])
    with pytest.raises(ConfigError, match="'attn' names blocks.0.attn, a Attention module"):
        lora_targets(model, ["attn"])
    with pytest.raises(ConfigError, match="'head' names head, the classifier"):
        lora_targets(model, ["head"])
    resnet = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(ConfigError, match="none of the default targets .* e.g. "):
        lora_targets(resnet, None)


class Layers(torch.nn.Module):
    """Conv2d and Linear layers of every kind, and a classifier (as timm records it)."""

    def __init__(self) -> None:
        from timm.layers import Conv2dSame, Linear, StdConv2d

        super().__init__()
        self.pretrained_cfg = {"classifier": "head"}
        self.plain = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(4, 4)
        self.std = StdConv2d(4, 4, 3)
        self.same = Conv2dSame(4, 4, 3, stride=2)
        self.grouped = torch.nn.Conv2d(4, 4, 3, groups=2)
        self.dilated = torch.nn.Conv2d(4, 4, 3, dilation=2)
        self.reflect = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.timm_linear = Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)


@pytest.mark.parametrize(
    "target, why",
    [
        ("std", r"std is a timm\.layers\.std_conv\.StdConv2d \(a subclass with its own forward\)"),
        ("same", r"same is a timm\.layers\.conv2d_same\.Conv2dSame"),
        ("grouped", r"grouped is a Conv2d with groups=2;"),
        ("dilated", r"dilated is a Conv2d with dilation=\(2, 2\);"),
        ("reflect", r"reflect is a Conv2d with padding_mode='reflect';"),
        ("timm_linear", r"timm_linear is a timm\.layers\.linear\.Linear"),
    ],
)
def test_lora_refuses_layers_whose_merged_weights_would_compute_otherwise(target, why):
    """peft wraps any Linear/Conv2d, but its adapter convolution takes the kernel, stride and
    padding alone, and a subclass's own forward (weight standardisation, dynamic padding)
    is not what a plain layer with the merged weight computes: a config error naming the
    layer, by name or by suffix, as a default target too."""
    model = Layers()
    assert lora_targets(model, ["plain", "fc"]) == ["plain", "fc"]  # k3 s2 p1, Linear
    with pytest.raises(ConfigError, match=rf"^model\.lora\.targets: {why}"):
        lora_targets(model, ["plain", target])
    model.blocks = torch.nn.ModuleDict({"attn": torch.nn.ModuleDict()})
    model.blocks["attn"].qkv = copy.deepcopy(getattr(model, target))  # a default target
    with pytest.raises(ConfigError, match=r"blocks\.attn\.qkv is a"):
        lora_targets(model, None)


@pytest.mark.parametrize(
    "name, kwargs, lora",
    [  # conv1.0 and layer2.0.conv1 of timm's test_resnet: 3x3 kernels, stride 2, padding 1
        ("test_resnet", {}, {"targets": ["conv1.0", "layer2.0.conv1"], "rank": 2, "alpha": 4}),
        (VIT, VIT_KWARGS, {"rank": 4, "alpha": 8, "dropout": 0.1}),
    ],
    ids=["conv-k3-s2-p1", "vit-dropout-0.1"],
)
def test_lora_merged_weights_give_the_adapted_models_eval_output(name, kwargs, lora):
    """After a training step (B non-zero), a plain timm model loaded with the merged state
    dict computes the adapted model's eval output: a strided, padded Conv2d target, and
    adapter dropout (peft's, on the adapter's input in training, the identity in eval)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, pretrained=False, kwargs=kwargs, lora=LoraConfig(**lora))
    model, _ = build_model(cfg, 3, None)
    for m in model.modules():  # timm zero-initialises the residual branches' last BatchNorm
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    report = apply_lora(model, cfg.lora)
    Freezer(model, cfg)
    for layer in report.modules:
        base = model.get_submodule(layer).base_layer
        if isinstance(base, torch.nn.Conv2d):
            assert (base.kernel_size, base.stride, base.padding) == ((3, 3), (2, 2), (1, 1))
        dropout = model.get_submodule(layer).lora_dropout["default"]
        assert isinstance(dropout, torch.nn.Dropout) == bool(lora.get("dropout"))
    train_step(model)
    state = model.state_dict()
    assert all(state[f"{n}.lora_B.default.weight"].abs().sum() > 0 for n in report.modules)
    plain = timm.create_model(name, num_classes=3, **kwargs)
    plain.load_state_dict(merged_state_dict(model))
    plain.eval()
    model.eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"model": {"lora": {}, "freeze": "backbone"}}, "drop model.freeze"),
        ({"model": {"lora": {}}, "train": {"epochs": 3, "lp_epochs": 1}}, "train.lp_epochs does"),
        ({"model": {"lora": {}}, "train": {"l2sp": 0.1}}, "train.l2sp does not combine"),
        ({"model": {"lora": {}}, "teacher": {"name": "test_resnet"}}, "finetune method"),
        ({"model": {"lora": {"targets": []}}}, r"model\.lora\.targets"),
        ({"model": {"lora": {"rank": 0}}}, r"model\.lora\.rank"),
        ({"model": {"lora": {"rnak": 4}}}, r"model\.lora\.rnak"),
    ],
)
def test_lora_config_errors(sections, message):
    with pytest.raises(ConfigError, match=message):
        validate(sections)


def vit_config(tmp_path: Path, train: Path, val: Path, **model) -> dict:
    model = {"name": VIT, "pretrained": False, "kwargs": VIT_KWARGS, **model}
    return small_config(tmp_path, train, val, model=model)


def test_lora_dry_run_plan_and_cli_errors(tmp_path, squares, write_config, run_cli, monkeypatch):
    cfg = write_config(vit_config(tmp_path, *squares, lora={"rank": 4, "alpha": 8}))
    proc = run_cli("finetune", cfg, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "freeze: backbone but the LoRA adapters" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("lora "))
    assert "rank 4, alpha 8 (scale 2) on 4 layers: blocks.*.attn.qkv, blocks.*.attn.proj" in line
    assert "trains 1,611 of 10,491 parameters (15.36%: 1,536 adapter, 75 classifier)" in line
    proc = run_cli("finetune", cfg, "--dry-run", "model.lora.targets=[qkv, fc3]")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "model.lora.targets: 'fc3' names no Linear or Conv2d" in line
    assert "(did you mean 'fc" in line
    # peft missing: one line naming the key and the extra, before any data is read
    monkeypatch.setitem(sys.modules, "peft", None)
    proc = run_cli("finetune", cfg, "--dry-run")
    assert proc.returncode == 2
    assert error_line(proc) == (
        "error: model.lora: needs the peft library, which is not installed: "
        "pip install 'tlkd[lora]'"
    )


def test_shipped_lora_config():
    from conftest import REPO

    folder = REPO / "configs" / "cifar10-transfer"
    cfg = load_config(folder / "lora.yaml")
    base = load_config(folder / "finetune-base.yaml")
    pre = load_config(folder / "pretrain5-vit.yaml")
    assert cfg.model.lora is not None and cfg.model.name == pre.model.name
    assert cfg.model.kwargs == pre.model.kwargs
    assert str(cfg.model.pretrained).endswith("runs/cifar5-pretrain-vit")
    assert cfg.data == base.data and cfg.train.epochs == base.train.epochs
    assert set(pre.data.classes) & set(cfg.data.classes) == set()


# --- a run: saved weights, evaluate without peft, resume, wise ----------------------------------


def pretrained_vit(path: Path, seed: int = 7) -> Path:
    """Weights of the tiny ViT for 5 classes (random, seeded): a 3-class run gets a new head."""
    torch.manual_seed(seed)
    model = timm.create_model(VIT, num_classes=5, **VIT_KWARGS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_config(root: Path, train: Path, val: Path, weights: Path, name: str) -> dict:
    raw = vit_config(root, train, val, pretrained=str(weights), lora={"rank": 4, "alpha": 8})
    raw["experiment"] = name
    raw["train"].update(epochs=2, optimizer={"name": "adamw", "lr": 0.05, "weight_decay": 0.01})
    return raw


def quiet_finetune(raw: dict, resume: Path | None = None) -> dict:
    return finetune(validate(raw), reporter=Reporter(quiet=True), resume=resume)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-epoch LoRA run from YAML via the CLI (and its pretrained file)."""
    import yaml
    from typer.testing import CliRunner

    from tlkd.cli import app

    root = tmp_path_factory.mktemp("lora")
    train = write_images(root / "train", per_class=8, seed=31)
    val = write_images(root / "val", per_class=4, seed=32)
    weights = pretrained_vit(root / "pre.safetensors")
    config = root / "lora.yaml"
    config.write_text(yaml.safe_dump(run_config(root, train, val, weights, "lora")))
    result = CliRunner().invoke(app, ["finetune", str(config)])
    assert result.exit_code == 0, result.output
    assert "lora        rank 4, alpha 8 (scale 2) on 4 layers" in result.output
    return root / "runs" / "lora", weights


def test_lora_run_saves_merged_weights_that_plain_timm_loads(lora_run, monkeypatch):
    run, weights = lora_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["lora"]["modules"] == ADAPTED
    assert summary["trainable_params"] == summary["lora"]["adapter_params"] + 24 * 3 + 3
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert "blocks.0.attn.qkv.lora_B.default.weight" in state  # unmerged, for resume
    saved = load_file(run / "model.safetensors")
    plain = timm.create_model(VIT, num_classes=3, **VIT_KWARGS).state_dict()
    assert saved.keys() == plain.keys()
    # the start: the pretrained backbone (B = 0: nothing merged in), the new head
    start, pre = load_file(run / "start.safetensors"), load_file(weights)
    assert start.keys() == plain.keys()
    assert all(torch.equal(start[k], pre[k]) for k in start if not k.startswith("head."))
    # plain timm loads model.safetensors and scores the run's best val top-1 on its val data
    model = timm.create_model(
        VIT, pretrained=True, num_classes=3, **VIT_KWARGS,
        pretrained_cfg_overlay=dict(file=str(run / "model.safetensors"), num_classes=3),
    )  # fmt: skip
    cfg = load_config(run / "config.yaml", [f"model.pretrained={run}"])
    exp = build_experiment(cfg, for_training=False, log=lambda _: None)
    assert exp.lora is None and not any(".lora_" in k for k in exp.model.state_dict())
    logits, targets = predict(model, exp.loaders.val, torch.device("cpu"))
    assert classification_metrics(logits, targets)["top1"] == summary["best_val_top1"]
    # tlkd evaluate and export's model need no peft for it
    monkeypatch.setitem(sys.modules, "peft", None)
    ev = evaluate(run, speed=False, reporter=Reporter(quiet=True))
    assert ev["top1"] == summary["best_val_top1"]
    exported, _, _ = load_run_model(run)
    got = exported.state_dict()
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)


def test_lora_wise_starts_at_the_base_and_ends_at_the_merged_weights(lora_run):
    run, _ = lora_run
    summary = wise(run, [0, 1], Reporter(quiet=True))
    assert summary["wise"]["theta1"].endswith("LoRA merged)")
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    by_alpha = {r["alpha"]: r for r in summary["wise"]["alphas"]}
    assert by_alpha[1]["val_top1"] == last["val_top1"]
    assert by_alpha[1]["val_loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    # the final merged weights: W + (alpha / r) B A of the checkpoint's adapters
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    plain = timm.create_model(VIT, num_classes=3, **VIT_KWARGS)
    theta1 = merged_checkpoint(plain, LoraConfig(rank=4, alpha=8), state)
    for name in ADAPTED:
        a, b = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
        want = state[f"{name}.base_layer.weight"] + 2.0 * b @ a  # scale 8 / 4
        torch.testing.assert_close(theta1[f"{name}.weight"], want)


def test_lora_resumes_exactly_after_a_stop_inside_an_epoch(tmp_path, monkeypatch):
    train = write_images(tmp_path / "train", per_class=8, seed=41)
    val = write_images(tmp_path / "val", per_class=4, seed=42)
    weights = pretrained_vit(tmp_path / "pre.safetensors")
    full = Path(quiet_finetune(run_config(tmp_path, train, val, weights, "full"))["run_dir"])
    seen: dict = {}
    train_epoch, step = Trainer.train_epoch, Reporter.step

    def spy_epoch(self, epoch):
        seen.update(trainer=self, epoch=epoch)
        return train_epoch(self, epoch)

    def stop_at(self, n, *args):
        step(self, n, *args)
        if seen["epoch"] == 1 and n == 2 and not seen.get("stopped"):
            seen["stopped"] = True
            seen["trainer"]._signals.received = "SIGTERM"

    monkeypatch.setattr(Trainer, "train_epoch", spy_epoch)
    monkeypatch.setattr(Reporter, "step", stop_at)
    with pytest.raises(Interrupted):
        quiet_finetune(run_config(tmp_path, train, val, weights, "cut"))
    cut = tmp_path / "runs" / "cut"
    quiet_finetune(run_config(tmp_path, train, val, weights, "cut"), resume=cut)
    learned = ("train_loss", "train_top1", "val_loss", "val_top1")
    rows = [
        [
            {k: json.loads(r)[k] for k in learned}
            for r in (d / "metrics.jsonl").read_text().splitlines()
        ]
        for d in (cut, full)
    ]
    assert rows[0] == rows[1]
    for name in ("model.safetensors", "start.safetensors"):
        a, b = load_file(cut / name), load_file(full / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(cut / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
