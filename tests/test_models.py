"""Models: freezing (and unfreezing), new heads, loading weights from files and run dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import MODEL, small_config
from safetensors.torch import load_file, save_file
from torch import nn

from tlkd.config.loader import validate
from tlkd.config.schema import ModelConfig
from tlkd.engine.progress import Reporter
from tlkd.engine.trainer import Trainer
from tlkd.errors import ConfigError, TlkdError
from tlkd.models.factory import build_model
from tlkd.models.freeze import Freezer
from tlkd.models.head import feature_width
from tlkd.recipes.finetune import finetune
from tlkd.run.rundir import RunDir

CLASSES = ["blue", "green", "red"]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_with_snapshots(tmp_path, squares, monkeypatch, **model):
    """Finetune the tiny model for two epochs; return its state when training starts and
    after each epoch, and the run's summary. The epochs' states are the run's own
    checkpoints: checkpoint.prev.pt holds epoch 1's, checkpoint.pt epoch 2's."""
    states: list[dict[str, torch.Tensor]] = []
    fit = Trainer.fit

    def spy_fit(self, *args, **kwargs):
        states.append(snapshot(self.model))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", spy_fit)
    # keep both checkpoints (a finished run drops checkpoint.prev.pt): they are the snapshots
    monkeypatch.setattr(RunDir, "finish_checkpoints", lambda self, keep: None)
    raw = small_config(tmp_path, *squares, model=model, train={"epochs": 2})
    summary = finetune(validate(raw), reporter=Reporter(quiet=True))
    run = Path(summary["run_dir"])
    for name, epoch in (("checkpoint.prev.pt", 1), ("checkpoint.pt", 2)):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == epoch and ckpt["partial"] is None
        states.append(ckpt["model"])
    assert len(states) == 3
    return states, summary


def under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def changed(a: dict, b: dict, keys) -> list[str]:
    return [k for k in keys if not torch.equal(a[k], b[k])]


def float_params(model_name: str = MODEL) -> list[str]:
    return [n for n, _ in timm.create_model(model_name, num_classes=3).named_parameters()]


def bn_stats(state: dict) -> list[str]:
    return [k for k in state if k.endswith(("running_mean", "running_var"))]


# --- freezing ----------------------------------------------------------------------------------


def test_freeze_none_trains_everything(tmp_path, squares, monkeypatch):
    (start, *_, end), summary = train_with_snapshots(tmp_path, squares, monkeypatch)
    params = float_params()
    assert changed(start, end, params) == params
    assert changed(start, end, bn_stats(start)) == bn_stats(start)
    assert summary["trainable_params"] == summary["params"]


def test_freeze_backbone_trains_only_the_classifier(tmp_path, squares, monkeypatch):
    (start, *_, end), summary = train_with_snapshots(
        tmp_path, squares, monkeypatch, freeze="backbone"
    )
    backbone = [k for k in start if not under(k, ["fc"])]
    assert len(backbone) > 50
    # bit-identical: weights, BatchNorm running statistics and their counters
    assert changed(start, end, backbone) == []
    assert changed(start, end, ["fc.weight", "fc.bias"]) == ["fc.weight", "fc.bias"]
    assert summary["trainable_params"] == 96 * 3 + 3  # test_resnet: 96 features -> 3 classes
    assert summary["params"] == sum(
        p.numel() for p in timm.create_model(MODEL, num_classes=3).parameters()
    )


def test_frozen_batchnorm_stats_move_when_freeze_bn_stats_is_off(tmp_path, squares, monkeypatch):
    (start, *_, end), _ = train_with_snapshots(
        tmp_path, squares, monkeypatch, freeze="backbone", freeze_bn_stats=False
    )
    frozen_params = [k for k in float_params() if not under(k, ["fc"])]
    assert changed(start, end, frozen_params) == []  # no gradient steps ...
    assert changed(start, end, bn_stats(start)) == bn_stats(start)  # ... but batch statistics


def test_freeze_by_module_names(tmp_path, squares, monkeypatch):
    frozen = ["conv1", "bn1", "layer1"]
    (start, *_, end), _ = train_with_snapshots(tmp_path, squares, monkeypatch, freeze=frozen)
    frozen_keys = [k for k in start if under(k, frozen)]
    trained = [k for k in float_params() if not under(k, frozen)]
    assert any(k.startswith("layer1.") for k in frozen_keys)
    assert changed(start, end, frozen_keys) == []
    assert changed(start, end, trained) == trained
    assert changed(start, end, ["layer2.0.bn1.running_mean"]) == ["layer2.0.bn1.running_mean"]


def test_unfreeze_after_trains_frozen_modules_from_the_next_epoch(tmp_path, squares, monkeypatch):
    (start, epoch1, epoch2), _ = train_with_snapshots(
        tmp_path, squares, monkeypatch, freeze="backbone", unfreeze_after=1
    )
    backbone = [k for k in start if not under(k, ["fc"])]
    backbone_params = [k for k in float_params() if not under(k, ["fc"])]
    assert changed(start, epoch1, backbone) == []
    assert changed(start, epoch1, ["fc.weight"]) == ["fc.weight"]
    assert changed(epoch1, epoch2, backbone_params) == backbone_params
    assert changed(epoch1, epoch2, bn_stats(start)) == bn_stats(start)


def test_unknown_module_name_to_freeze_suggests():
    model = timm.create_model(MODEL, num_classes=3)
    with pytest.raises(ConfigError) as info:
        Freezer(model, ModelConfig(name=MODEL, freeze=["layr1", "fc"]))
    assert info.value.key == "model.freeze"
    assert "'layr1'" in str(info.value)
    assert "did you mean 'layer1'?" in str(info.value)


def test_freezer_sets_requires_grad_and_keeps_frozen_bn_in_eval_mode():
    model = timm.create_model(MODEL, num_classes=3)
    freezer = Freezer(model, ModelConfig(name=MODEL, freeze=["layer2"]))
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith("layer2."))
    freezer.train_mode()
    assert model.training and not model.layer2[0].bn1.training and model.layer1[0].bn1.training
    freezer.set_frozen(False)
    freezer.train_mode()
    assert all(p.requires_grad for p in model.parameters())
    assert model.layer2[0].bn1.training


def test_freeze_backbone_of_a_vit_freezes_its_loose_parameters():
    model = timm.create_model("test_vit", num_classes=3)
    Freezer(model, ModelConfig(name="test_vit", freeze="backbone"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["head.bias", "head.weight"]
    assert not model.cls_token.requires_grad and not model.pos_embed.requires_grad


# --- heads -------------------------------------------------------------------------------------


def test_mlp_head_layers_and_sizes():
    model, report = build_model(
        ModelConfig(name=MODEL, head={"hidden": [16], "dropout": 0.1}), 3, CLASSES
    )
    head = model.fc
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features) == (96, 16)
    assert head[2].p == pytest.approx(0.1)
    assert (head[3].in_features, head[3].out_features) == (16, 3)
    assert report.source.startswith("random") and report.head == "new"
    model.eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_head_with_two_hidden_layers_gelu_no_dropout_on_a_vit():
    model, _ = build_model(
        ModelConfig(name="test_vit", head={"hidden": [32, 8], "activation": "gelu"}), 5, None
    )
    # GELU by name from timm's activation registry: computes torch's GELU
    names = [type(m).__name__ for m in model.head]
    assert names == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    x = torch.randn(4, 8)
    torch.testing.assert_close(model.head[3](x), nn.functional.gelu(x))
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [32, 8, 5]
    model.eval()
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 5)


@pytest.mark.parametrize("name", [MODEL, "test_vit", "mobilenetv3_small_050"])
def test_feature_width_is_what_the_classifier_reads(name):
    # mobilenetv3: a conv of the head's own widens num_features (288) to 1024 before the fc
    model = timm.create_model(name, num_classes=3).eval()
    seen = []
    model.get_classifier().register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    backbone = timm.create_model(name, num_classes=0).eval()
    size = 64 if name.startswith("mobilenet") else 16
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
        out = backbone(torch.zeros(1, 3, size, size))
    assert feature_width(model) == feature_width(backbone) == seen[0].shape[-1] == out.shape[-1]


def test_without_head_config_the_classifier_is_timms_linear():
    model, _ = build_model(ModelConfig(name=MODEL), 4, None)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 4


def test_unknown_model_name_suggests():
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(name="resnet181"), 3, None)
    assert info.value.key == "model.name"
    assert "did you mean 'resnet18'?" in str(info.value)


# --- loading weights ---------------------------------------------------------------------------


@pytest.fixture
def reference():
    """A tiny model with non-default weights and BatchNorm statistics, in eval mode."""
    torch.manual_seed(123)
    model = timm.create_model(MODEL, num_classes=3)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 16, 16) * 2 + 1)  # moves the running statistics
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_weights_file_gives_identical_outputs(tmp_path, reference, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model, report = build_model(ModelConfig(name=MODEL, pretrained=str(path)), 3, CLASSES)
    assert report.source == str(path)
    assert report.head == "loaded"
    assert report.loaded == len(state)
    assert torch.equal(outputs(model, X), outputs(reference, X))


def test_load_run_dir_gives_the_runs_model(trained_run):
    plain = timm.create_model(MODEL, num_classes=3)
    plain.load_state_dict(load_file(str(trained_run.dir / "model.safetensors")))
    model, report = build_model(
        ModelConfig(name=MODEL, pretrained=str(trained_run.dir)), 3, trained_run.classes
    )
    assert report.head == "loaded"
    assert report.source == str(trained_run.dir / "model.safetensors")
    assert torch.equal(outputs(model, X), outputs(plain, X))


@pytest.mark.parametrize(
    "classes", [["cyan", "magenta", "yellow"], ["cyan", "magenta"]], ids=["same-count", "fewer"]
)
def test_run_dir_with_other_classes_keeps_backbone_new_head(trained_run, classes):
    saved = load_file(str(trained_run.dir / "model.safetensors"))
    torch.manual_seed(0)
    model, report = build_model(
        ModelConfig(name=MODEL, pretrained=str(trained_run.dir)), len(classes), classes
    )
    assert report.head == "new"
    state = model.state_dict()
    backbone = [k for k in saved if not under(k, ["fc"])]
    assert changed(saved, state, backbone) == []
    assert model.fc.out_features == len(classes)
    if len(classes) == 3:
        assert not torch.equal(state["fc.weight"], saved["fc.weight"])


def test_run_dir_into_an_mlp_head_keeps_backbone(trained_run):
    saved = load_file(str(trained_run.dir / "model.safetensors"))
    model, report = build_model(
        ModelConfig(name=MODEL, pretrained=str(trained_run.dir), head={"hidden": [8]}),
        3,
        trained_run.classes,
    )
    assert report.head == "new"
    state = model.state_dict()
    assert changed(saved, state, [k for k in saved if not under(k, ["fc"])]) == []


def test_weights_of_another_architecture_are_a_config_error(tmp_path):
    vit = timm.create_model("test_vit", num_classes=3)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(name=MODEL, pretrained=str(path)), 3, None)
    assert info.value.key == "model.pretrained"
    assert "other architecture" in str(info.value)
    assert "\n" not in str(info.value)


def test_weights_of_another_size_are_a_config_error(tmp_path):
    other = timm.create_model("resnet10t", num_classes=3)
    path = tmp_path / "resnet10t.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ConfigError, match="has shape .* the model expects"):
        build_model(ModelConfig(name=MODEL, pretrained=str(path)), 3, None)


def test_weights_missing_tensors_are_a_config_error(tmp_path, reference):
    state = dict(list(reference.state_dict().items())[:10])
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="lacks"):
        build_model(ModelConfig(name=MODEL, pretrained=str(path)), 3, None)


def test_unreadable_or_missing_weights(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(TlkdError, match="cannot read weights"):
        build_model(ModelConfig(name=MODEL, pretrained=str(junk)), 3, None)
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(name=MODEL, pretrained=str(tmp_path / "gone.pth")), 3, None)
    assert info.value.key == "model.pretrained"
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ConfigError, match="model.safetensors"):
        build_model(ModelConfig(name=MODEL, pretrained=str(tmp_path / "empty-run")), 3, None)


def test_run_summary_records_the_classes_used_for_head_matching(trained_run):
    summary = json.loads((trained_run.dir / "summary.json").read_text())
    assert summary["classes"] == trained_run.classes
