"""distill.cache: stored views and teacher logits stand in for the live teacher."""

from __future__ import annotations

import json

import timm
import torch
from test_distill import SMALL, _teacher_file

from tlkd.config import load_config
from tlkd.config.schema import AugmentConfig
from tlkd.data.batch_aug import BatchAugment
from tlkd.data.memory import MemoryLoader
from tlkd.data.ragged import Ragged
from tlkd.distill.cache import CachedViews, Slot, build_bank
from tlkd.distill.teacher import Teacher
from tlkd.errors import ConfigError
from tlkd.recipes.distill import distill

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _loader(n=20, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    aug = BatchAugment(AugmentConfig(scale=(0.5, 1.0), color_jitter=0.3), 16, MEAN, STD)
    return MemoryLoader(
        images, torch.arange(n) % 10, list(range(n)), batch, MEAN, STD, aug,
        torch.Generator().manual_seed(1), drop_last=True,
    )  # fmt: skip


def _teacher(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("resnet20", num_classes=10)
    return Teacher(model, None, "resnet20", False, MEAN, STD)


def test_cached_logits_are_the_teachers_on_the_views_served(tmp_path):
    loader, teacher = _loader(), _teacher()
    logs: list[str] = []
    cpu = torch.device("cpu")
    bank = build_bank(loader, [teacher], [True], 3, 0, None, cpu, tmp_path, logs.append)
    assert bank.params.shape == (20, 3, 10) and bank.logits[0].shape == (20, 3, 10)
    assert bank.built_s > 0 and "20 images x 3 views" in logs[0]
    slot = Slot()
    seen_views = set()
    for _epoch in range(3):
        for images, _targets in CachedViews(loader, bank, slot):
            with torch.inference_mode():
                live, _ = teacher(images)
            torch.testing.assert_close(slot.logits[0], live, atol=1e-4, rtol=1e-4)
            seen_views.add(images[0].sum().item())
    assert len(seen_views) > 1  # images draw different stored views across epochs
    # the same teacher and data: read back, nothing computed
    again = build_bank(loader, [teacher], [True], 3, 0, None, cpu, tmp_path, logs.append)
    assert again.built_s == 0 and "read from" in logs[-1]
    assert torch.equal(again.logits[0], bank.logits[0])
    # other weights: other logits, the same stored views
    other = build_bank(loader, [_teacher(1)], [True], 3, 0, None, cpu, tmp_path, logs.append)
    assert other.built_s > 0 and torch.equal(other.params, bank.params)
    assert not torch.allclose(other.logits[0], bank.logits[0])


def test_a_bank_of_images_of_several_sizes_serves_each_its_views(tmp_path):
    """A Ragged store (a folder of several image sizes): views drawn at each image's own
    size, the teacher's cached logits equal to its live ones on the views served."""
    g = torch.Generator().manual_seed(0)
    sizes = [(16, 16), (20, 28), (24, 18)] * 4
    pixels = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    offsets = torch.tensor([0, *(p.numel() for p in pixels)]).cumsum(0)[:-1]
    index = torch.cat([offsets[:, None], torch.tensor([(3, h, w) for h, w in sizes])], 1)
    store = Ragged(torch.cat([p.reshape(-1) for p in pixels]), index)
    aug = BatchAugment(AugmentConfig(scale=(0.5, 1.0)), 16, MEAN, STD)
    loader = MemoryLoader(
        store, torch.arange(12) % 10, list(range(12)), 4, MEAN, STD, aug,
        torch.Generator().manual_seed(1), drop_last=True,
    )  # fmt: skip
    teacher, cpu = _teacher(), torch.device("cpu")
    bank = build_bank(loader, [teacher], [True], 2, 0, None, cpu, tmp_path, lambda m: None)
    # each stored box fits its own image: in pixels, within the configured area
    h, w = (s.repeat_interleave(2) for s in store.sizes())
    area = bank.params[..., 2].reshape(-1) * bank.params[..., 3].reshape(-1)
    assert area.min() >= 0.45 and area.max() <= 1.0 + 1e-6 and len(set(h.tolist())) == 3
    slot = Slot()
    for images, _ in CachedViews(loader, bank, slot):
        assert images.shape[1:] == (3, 16, 16)
        with torch.inference_mode():
            live, _ = teacher(images)
        torch.testing.assert_close(slot.logits[0], live, atol=1e-4, rtol=1e-4)


def _distill_cfg(tmp_path, name, *extra):
    teacher = _teacher_file(tmp_path, "resnet20", 10)
    return load_config(
        None,
        [
            f"output_dir={tmp_path / 'runs'}",
            f"experiment={name}",
            *SMALL,
            "train.epochs=2",
            "model.name=resnet20",
            "teacher.name=resnet20",
            f"teacher.pretrained={teacher}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.subset_seed=0",
            *extra,
        ],
    )


def test_a_deterministic_view_makes_the_cache_exact(tmp_path):
    fixed = ["data.augment.crop_mode=rrc", "data.augment.scale=[1,1]", "data.augment.ratio=[1,1]"]
    fixed += ["data.augment.hflip=0", "data.augment.color_jitter=0"]
    live = distill(_distill_cfg(tmp_path, "live", *fixed))
    assert "teacher_cache" not in live
    cached = distill(_distill_cfg(tmp_path, "cached", *fixed, "distill.cache.views=1"))
    assert cached["data_path"].startswith("in memory")
    assert cached["teacher_cache"]["build_s"] > 0
    rows = [
        [json.loads(x) for x in (tmp_path / "runs" / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("live", "cached")
    ]
    for a, b in zip(*rows, strict=True):
        assert abs(a["train_loss_kd"] - b["train_loss_kd"]) < 1e-4 * max(1.0, a["train_loss_kd"])
        assert a["val_top1"] == b["val_top1"]
    # a second run with the same teacher and data reuses the bank
    again = distill(_distill_cfg(tmp_path, "again", *fixed, "distill.cache.views=1", "seed=3"))
    assert again["teacher_cache"]["build_s"] == 0
    assert again["teachers"][0]["val_top1"] == cached["teachers"][0]["val_top1"]


def test_a_sweep_measures_the_teachers_val_accuracy_once(tmp_path, monkeypatch):
    """With or without distill.cache: the same teacher on the same val images is scored once
    and remembered, so the runs of a sweep do not each pay a pass over the val set."""
    import tlkd.recipes.distill as recipe

    calls = []
    measure = recipe._teacher_top1
    monkeypatch.setattr(recipe, "_teacher_top1", lambda *a: calls.append(1) or measure(*a))
    first = distill(_distill_cfg(tmp_path, "s0", "train.epochs=1"))
    second = distill(_distill_cfg(tmp_path, "s1", "train.epochs=1", "seed=1"))
    assert len(calls) == 1
    assert first["teachers"][0]["val_top1"] == second["teachers"][0]["val_top1"] is not None


def test_the_cache_refuses_feature_losses_and_the_file_path(tmp_path):
    cases = [
        (["distill.cache.views=2", "distill.losses=[{type: at}]"], "distill.losses.0"),
        (["distill.cache.views=2", "data.in_memory=false"], "distill.cache"),
        (["distill.cache.views=2", "teacher.train_bn=true"], "teacher.train_bn"),
    ]
    for extra, key in cases:
        try:
            distill(_distill_cfg(tmp_path, "bad", *extra))
        except ConfigError as err:
            assert err.key == key, (extra, err)
        else:
            raise AssertionError(f"{extra} was accepted")


def test_the_cache_refuses_what_it_cannot_serve_in_a_dry_run(tmp_path):
    """The same refusals before a dry run ends, so ``--dry-run`` and a sweep's checks catch
    them (not the run itself, after the sweep started); the feature loss is named first, not
    the data path that crd's index wrapper would otherwise appear to break."""
    from tlkd.engine.progress import Reporter

    cases = [
        (["distill.losses=[{type: crd, nce_k: 8}, {type: ce}]"], "distill.losses.0"),
        (["distill.losses=[{type: ce}, {type: rkd}]"], "distill.losses.1"),
        (["distill.losses=[{type: reviewkd}]", "data.in_memory=false"], "distill.losses.0"),
        (["data.in_memory=false"], "distill.cache"),
        (["teacher.train_bn=true"], "teacher.train_bn"),
    ]
    for extra, key in cases:
        cfg = _distill_cfg(tmp_path, "bad", "distill.cache.views=2", *extra)
        try:
            distill(cfg, dry_run=True, reporter=Reporter(quiet=True))
        except ConfigError as err:
            assert err.key == key, (extra, err)
        else:
            raise AssertionError(f"{extra} was accepted by a dry run")
    assert not (tmp_path / "runs").exists()


def test_channels_last_distillation_with_the_cache_runs(tmp_path):
    summary = distill(
        _distill_cfg(tmp_path, "cl", "train.channels_last=true", "distill.cache.views=2")
    )
    assert summary["status"] == "finished" and summary["teacher_cache"]["views"] == 2
