"""Defaults chosen from the data and the run: augmentation policy, input size, weight decay,
and ``model.pretrained: auto`` (fast and quiet offline, cached weights used)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import MODEL, small_config, write_images

from tlkd.config.loader import effective, load_config, validate
from tlkd.config.schema import AugmentConfig, ModelConfig
from tlkd.data.defaults import (
    POLICIES,
    RunFacts,
    choose_image_size,
    choose_policy,
    default_lr,
    default_warmup,
    default_weight_decay,
    resolve_augment,
)
from tlkd.errors import TlkdError
from tlkd.models import factory


def facts(**kw) -> RunFacts:
    base = dict(
        image_px=32, train_images=5000, epochs=10, pretrained=False, mode="finetune",
        dataset="folder",
    )  # fmt: skip
    base.update(kw)
    return RunFacts(**base)


def test_policy_rule():
    assert choose_policy(facts(epochs=4))[0] == "none"  # the 4-epoch case
    assert choose_policy(facts(epochs=4, pretrained=True))[0] == "light"
    assert choose_policy(facts(epochs=2, pretrained=True))[0] == "none"
    assert choose_policy(facts(epochs=10))[0] == "light"
    big = facts(image_px=224, train_images=50_000, epochs=100)
    assert choose_policy(big)[0] == "strong"
    assert choose_policy(facts(image_px=32, train_images=50_000, epochs=100))[0] == "light"
    assert choose_policy(facts(mode="pretrain", epochs=2))[0] == "strong"


def test_explicit_keys_win_and_digits_are_not_flipped():
    aug = AugmentConfig.model_validate({"hflip": 0.25, "color_jitter": 0.1})
    out, why = resolve_augment(aug, facts(epochs=10))
    assert out.policy == "light" and out.crop_mode == "rkrr" and out.scale == (0.7, 1.0)
    assert out.hflip == 0.25 and out.color_jitter == 0.1
    assert "set by you: color_jitter, hflip" in why
    out, _ = resolve_augment(AugmentConfig(), facts(dataset="digits"))
    assert out.hflip == 0.0
    out, why = resolve_augment(AugmentConfig(policy="strong"), facts(epochs=1))
    assert out.model_dump(exclude={"policy"}) == AugmentConfig(**POLICIES["strong"]).model_dump(
        exclude={"policy"}
    )
    assert why.startswith("set by data.augment.policy: random crop (8-100% of the image)")


def test_reason_describes_the_views_in_effect():
    """An explicit key changes what the plan says, not only what runs."""
    aug = AugmentConfig.model_validate({"scale": [0.6, 1.0]})
    _, why = resolve_augment(aug, facts(epochs=10))
    assert why.endswith("set by you: scale: random crop (60-100% of the image) and flip"), why
    _, why = resolve_augment(AugmentConfig(), facts(epochs=2))
    assert why.endswith(": the whole image"), why


def test_image_size_rule():
    assert choose_image_size(28, 224, fixed=False)[0] == 32
    assert choose_image_size(96, 224, fixed=False)[0] == 96
    assert choose_image_size(500, 224, fixed=False)[0] == 224
    assert choose_image_size(28, 224, fixed=True)[0] == 224
    assert choose_image_size(None, 160, fixed=False)[0] == 160


def test_weight_decay_by_family():
    assert default_weight_decay("sgd")[0] == 5e-4
    assert default_weight_decay("momentum")[0] == 5e-4
    assert default_weight_decay("adam")[0] == 5e-4  # coupled L2, like SGD's
    assert default_weight_decay("adamw")[0] == 0.05
    assert default_weight_decay("lamb")[0] == 0.05


def test_lr_rule_by_family_start_and_batch():
    assert default_lr("adamw", False, 64)[0] == 2e-3
    assert default_lr("adamw", True, 64)[0] == 5e-4
    assert default_lr("adam", False, 64)[0] == 2e-3  # adaptive: the same scale as adamw
    assert default_lr("sgd", False, 64)[0] == 0.05
    assert default_lr("sgd", True, 64)[0] == 0.01
    assert default_lr("sgd", False, 128)[0] == pytest.approx(0.1)  # linear in the batch
    lr, why = default_lr("adamw", False, 256)
    assert lr == pytest.approx(4e-3) and "sqrt scaled to batch 256" in why  # sqrt
    assert default_lr("lion", False, 64)[0] == pytest.approx(2e-3 / 3, rel=1e-2)


def test_warmup_rule():
    assert default_warmup(2)[0] == 0
    assert [default_warmup(e)[0] for e in (3, 8, 30, 60, 100, 300)] == [1, 1, 2, 3, 5, 5]


def _plan_config(tmp_path: Path, train_dir: Path, val_dir: Path, **over) -> dict:
    """A config that leaves the defaults under test unset."""
    cfg = small_config(tmp_path, train_dir, val_dir, **over)
    del cfg["data"]["image_size"], cfg["data"]["crop_pct"], cfg["data"]["augment"]
    del cfg["train"]["optimizer"]["weight_decay"], cfg["train"]["optimizer"]["lr"]
    del cfg["train"]["scheduler"]
    return cfg


def test_dry_run_plan_and_saved_config_record_the_choices(tmp_path, write_config, cli):
    train = write_images(tmp_path / "train", per_class=6, size=24, seed=1)
    val = write_images(tmp_path / "val", per_class=2, size=24, seed=2)
    cfg = _plan_config(tmp_path, train, val, train={"optimizer": {"name": "sgd"}, "epochs": 5})
    path = write_config(cfg)
    result = cli("finetune", path, "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "default     image_size: images of median 24px, raised to the minimum 32px" in out
    assert "default     augment: light (auto: 5 epochs on 18 images of 24px" in out
    assert "default     weight_decay: 0.0005 (sgd" in out
    assert "default     lr: 0.00625 (sgd from random weights: 0.05 at batch 64, linearly" in out
    assert "default     warmup_epochs: 1 (about 5% of 5 epochs" in out
    assert "sgd lr 0.00625, scheduler cosine" in out
    result = cli("finetune", path, "train.epochs=1")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # the config as given (read-only), and beside it what tlkd chose
    assert saved["data"]["image_size"] is None and saved["train"]["optimizer"]["lr"] is None
    chose = saved["resolved"]
    assert chose["data.image_size"] == 32 and chose["data.crop_pct"] == 1.0
    assert chose["data.augment"]["policy"] == "none"
    assert chose["data.augment"]["scale"] == [1.0, 1.0]
    assert chose["train.optimizer.weight_decay"] == 5e-4
    assert chose["train.optimizer.lr"] == 0.00625
    assert chose["train.scheduler.warmup_epochs"] == 0  # 1 epoch: no warm-up
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resolved"] == chose
    assert summary["defaults_chosen"]["augment"].startswith("none (auto: 1 epochs")
    assert summary["weights"] == "random"
    # the saved config reruns as it ran: what tlkd chose comes with it
    again = effective(load_config(run / "config.yaml"))
    assert again.data.augment.policy == "none" and again.data.image_size == 32


def test_resume_keeps_the_first_choices(tmp_path, write_config, cli):
    """Resuming with more epochs would change auto's choices (augmentation none -> light,
    warm-up 0 -> 1 epoch); the run keeps what its first start used, so the resume is of the
    same experiment (and is not refused as a different config)."""
    train = write_images(tmp_path / "train", per_class=6, seed=1)
    val = write_images(tmp_path / "val", per_class=2, seed=2)
    cfg = small_config(tmp_path, train, val, train={"epochs": 1})
    del cfg["data"]["augment"]
    cfg["train"]["scheduler"] = {"name": "cosine"}  # warm-up auto: 0 at 1 epoch, 1 at 6
    path = write_config(cfg)
    assert cli("finetune", path).exit_code == 0
    run = tmp_path / "runs" / "tiny"
    result = cli("finetune", path, "--resume", run, "train.epochs=6")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    assert saved["data.augment"]["policy"] == "none"
    assert saved["train.scheduler.warmup_epochs"] == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6
    # a finished run: nothing to continue, and nothing of it is touched
    summary = (run / "summary.json").read_text()
    result = cli("finetune", path, "--resume", run, "train.epochs=6")
    assert result.exit_code == 2
    assert "train.epochs: is 6 but tiny has finished 6 epochs" in result.output
    assert (run / "summary.json").read_text() == summary


def test_pretrained_auto_offline_falls_back_quickly_with_a_warning():
    start = time.perf_counter()
    model, report = factory.build_model(ModelConfig(name=MODEL), 3, None)
    assert time.perf_counter() - start < 5
    assert report.source.startswith("random (auto") and report.loaded == 0
    assert "no pretrained weights" in report.warning and MODEL in report.warning
    # the same random start as pretrained: false with the same seed
    torch.manual_seed(0)
    a, _ = factory.build_model(ModelConfig(name=MODEL), 3, None)
    torch.manual_seed(0)
    b, _ = factory.build_model(ModelConfig(name=MODEL, pretrained=False), 3, None)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_true_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(TlkdError, match="not cached and the Hub is unreachable"):
        factory.build_model(ModelConfig(name=MODEL, pretrained=True), 3, None)
    assert time.perf_counter() - start < 5


def test_pretrained_auto_uses_cached_weights_offline(tmp_path, monkeypatch):
    """Weights in the Hugging Face cache load with no network (the tests run offline)."""
    import huggingface_hub.constants as hub
    import timm
    from safetensors.torch import save_file

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    state = {k: v + 0.5 if v.is_floating_point() else v
             for k, v in timm.create_model(MODEL).state_dict().items()}  # fmt: skip
    repo = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    model, report = factory.build_model(ModelConfig(name=MODEL), 3, None)
    assert report.source == "timm hub" and report.warning is None
    assert torch.equal(model.state_dict()["conv1.0.weight"], state["conv1.0.weight"])


def test_teacher_refuses_auto(tmp_path, write_config):
    from tlkd.errors import ConfigError

    cfg = small_config(tmp_path, None, None, teacher={"name": MODEL, "pretrained": "auto"})
    with pytest.raises(ConfigError, match="teacher.pretrained"):
        load_config(write_config(cfg))


def test_the_validated_config_is_read_only(tmp_path):
    """Nothing writes into the user's config: building a run makes a new one with the chosen
    values, and lists them (``resolved``) for config.yaml and summary.json."""
    from pydantic import ValidationError

    from tlkd.recipes.build import build_experiment

    train = write_images(tmp_path / "train", per_class=4, size=24, seed=1)
    val = write_images(tmp_path / "val", per_class=2, size=24, seed=2)
    raw = _plan_config(tmp_path, train, val)
    raw["train"]["precision"] = "fp32"
    cfg = validate(raw)
    before = cfg.model_dump()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.data.image_size = 64
    exp = build_experiment(cfg, dry_run=True)
    assert cfg.model_dump() == before
    assert cfg.data.image_size is None and cfg.train.optimizer.lr is None
    assert exp.source is cfg
    assert exp.cfg.data.image_size == exp.resolved["data.image_size"] == 32
    assert exp.cfg.train.optimizer.lr == exp.resolved["train.optimizer.lr"]
    assert exp.cfg.model.num_classes == exp.resolved["model.num_classes"] == 3


def test_rerun_reuses_the_choices_and_overrides_choose_again(tmp_path, write_config, cli):
    """A saved run's config reruns with what tlkd chose; with an override the choices are
    made again for the new inputs; augmentation keys left to the policy stay unset."""
    train = write_images(tmp_path / "train", per_class=6, size=24, seed=1)
    val = write_images(tmp_path / "val", per_class=2, size=24, seed=2)
    cfg = _plan_config(tmp_path, train, val, train={"epochs": 1})
    assert cli("finetune", write_config(cfg)).exit_code == 0
    saved_file = tmp_path / "runs" / "tiny" / "config.yaml"
    saved = yaml.safe_load(saved_file.read_text())
    assert saved["data"]["augment"] == {"policy": "auto"}  # the policy's keys: not written
    assert saved["resolved"]["train.optimizer.lr"] == 0.000707  # adamw 2e-3 x sqrt(8 / 64)
    again = load_config(saved_file)
    assert effective(again).train.optimizer.lr == 0.000707
    changed = load_config(saved_file, ["train.optimizer.name=sgd", "data.augment.policy=light"])
    assert changed.resolved == {}  # chosen again, for sgd and the light policy
    result = cli("finetune", saved_file, "train.optimizer.name=sgd", "data.augment.policy=light",
                 "experiment=sgd")  # fmt: skip
    assert result.exit_code == 0, result.output
    chose = yaml.safe_load((tmp_path / "runs" / "sgd" / "config.yaml").read_text())["resolved"]
    assert chose["train.optimizer.lr"] == 0.00625 and chose["train.optimizer.weight_decay"] == 5e-4
    assert chose["data.augment"]["scale"] == [0.7, 1.0]  # light's, not the schema's defaults
    # evaluate (with its speed timing) runs on the sizes the run chose
    result = cli("evaluate", tmp_path / "runs" / "tiny", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "tiny" / "eval.json").read_text())
    assert report["image_size"] == 32 and report["latency_ms"] > 0


def test_optimizer_variants_keep_their_family():
    assert default_lr("cadamw", False, 64)[0] == 2e-3  # cautious AdamW
    assert default_lr("fusedadamw", False, 64)[0] == 2e-3
    assert default_lr("clion", False, 64)[0] == pytest.approx(2e-3 / 3, rel=1e-2)
    assert default_lr("mars", False, 64, adaptive=True)[0] == 2e-3  # timm: has betas
    assert default_weight_decay("cadamw")[0] == 0.05
    assert default_weight_decay("adopt")[0] == 5e-4  # timm's adopt couples decay by default
    assert default_weight_decay("adoptw")[0] == 0.05
