"""Datasets: image folders, class subsets, held-out val splits, few-label selection."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import COLOURS, IMAGE_SIZE

from tlkd.config.loader import validate, with_values
from tlkd.data.datasets import build_splits
from tlkd.errors import ConfigError


def splits(train=None, val=None, seed: int = 0, **data):
    if train is not None:
        data["train"] = str(train)
    if val is not None:
        data["val"] = str(val)
    return build_splits(validate({"data": data}).data, seed)


def images(ds) -> list[bytes]:
    """The pixels of every image in ``ds``, in order (each test image is unique)."""
    return [np.asarray(ds[i][0]).tobytes() for i in range(len(ds))]


def colour_of(img) -> str:
    """The class colour closest to the image's mean colour."""
    mean = np.asarray(img, dtype=float).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda c: np.abs(mean - np.array(COLOURS[c])).sum())


def test_image_folder_classes_and_labels(squares):
    train, val = squares
    s = splits(train, val)
    assert s.classes == ["blue", "green", "red"]  # sorted folder names
    assert len(s.train) == 24 and len(s.val) == 12
    assert s.val_source == "data.val"
    for ds in (s.train, s.val):
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.mode == "RGB" and img.size == (16, 16)
            assert s.classes[label] == colour_of(img)
        assert ds.targets == [ds[i][1] for i in range(len(ds))]


def test_class_subset_keeps_only_those_and_remaps_labels_in_given_order(make_images):
    train = make_images("train", classes=["blue", "cyan", "green", "red"], per_class=5)
    val = make_images("val", classes=["blue", "cyan", "green", "red"], per_class=3)
    s = splits(train, val, classes=["red", "blue"])
    assert s.classes == ["red", "blue"]
    assert len(s.train) == 10 and len(s.val) == 6
    for ds in (s.train, s.val):
        assert sorted(set(ds.targets)) == [0, 1]
        for i in range(len(ds)):
            img, label = ds[i]
            assert ["red", "blue"][label] == colour_of(img)
            assert ds.targets[i] == label


def test_unknown_class_in_subset_suggests(squares):
    with pytest.raises(ConfigError) as info:
        splits(*squares, classes=["red", "grean"])
    assert info.value.key == "data.classes"
    assert "did you mean 'green'?" in str(info.value)


def test_samples_per_class_picks_exactly_n_seeded(squares):
    train, val = squares
    a = splits(train, val, seed=0, samples_per_class=3)
    assert len(a.train) == 9
    assert np.bincount(a.train.targets).tolist() == [3, 3, 3]
    assert len(a.val) == 12  # val is untouched
    again = splits(train, val, seed=0, samples_per_class=3)
    assert images(again.train) == images(a.train)
    other = splits(train, val, seed=1, samples_per_class=3)
    assert np.bincount(other.train.targets).tolist() == [3, 3, 3]
    assert set(images(other.train)) != set(images(a.train))
    # the picks are a subset of the full training set
    assert set(images(a.train)) <= set(images(splits(train, val).train))


def test_samples_per_class_more_than_available_is_an_error(squares):
    with pytest.raises(ConfigError) as info:
        splits(*squares, samples_per_class=9)
    assert info.value.key == "data.samples_per_class"
    assert "only 8" in str(info.value)


def test_fraction_of_each_class(squares):
    train, val = squares
    s = splits(train, val, fraction=0.25)
    assert np.bincount(s.train.targets).tolist() == [2, 2, 2]
    assert images(splits(train, val, fraction=0.25).train) == images(s.train)


def test_val_split_held_out_of_train_stratified_and_disjoint(squares):
    train, _ = squares
    s = splits(train, val_fraction=0.25, seed=3)
    assert s.classes == ["blue", "green", "red"]
    assert np.bincount(s.val.targets).tolist() == [2, 2, 2]  # 25% of 8, per class
    assert np.bincount(s.train.targets).tolist() == [6, 6, 6]
    train_imgs, val_imgs = set(images(s.train)), set(images(s.val))
    assert not train_imgs & val_imgs
    everything = set(images(splits(train, train).train))  # with a val folder nothing is held out
    assert len(everything) == 24
    assert train_imgs | val_imgs == everything
    assert "held out" in s.val_source
    # seeded: the same seed holds out the same images, another seed others
    assert set(images(splits(train, val_fraction=0.25, seed=3).val)) == val_imgs
    assert set(images(splits(train, val_fraction=0.25, seed=4).val)) != val_imgs


def test_few_labels_come_from_what_is_left_after_the_val_split(squares):
    train, _ = squares
    s = splits(train, val_fraction=0.25, samples_per_class=4)
    assert np.bincount(s.train.targets).tolist() == [4, 4, 4]
    assert not set(images(s.train)) & set(images(s.val))


def test_val_folder_with_other_classes_is_an_error(make_images):
    train = make_images("train", classes=["red", "green", "blue"], per_class=2)
    val = make_images("val", classes=["red", "green", "cyan"], per_class=2)
    with pytest.raises(ConfigError) as info:
        splits(train, val)
    assert info.value.key == "data.val"
    assert "'blue'" in str(info.value) and "'cyan'" in str(info.value)


def test_missing_and_empty_folders_are_errors(tmp_path, make_images):
    with pytest.raises(ConfigError) as info:
        splits(tmp_path / "nope")
    assert info.value.key == "data.train"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError) as info:
        splits(tmp_path / "nothing")
    assert info.value.key == "data.train"
    train = make_images("train", per_class=2)
    shutil.rmtree(train / "blue")
    (train / "blue").mkdir()
    with pytest.raises(ConfigError) as info:
        splits(train)
    assert info.value.key == "data.train"
    assert "blue" in str(info.value)


def test_embedded_digits_need_no_download():
    s = splits(dataset="digits")
    assert s.classes == [str(d) for d in range(10)]
    assert len(s.train) == 1442 and len(s.val) == 355
    img, label = s.train[0]
    assert img.mode == "RGB" and 0 <= label < 10


def test_transforms_give_the_configured_size(squares):
    import timm

    from tlkd.data.pipeline import build_transforms, resolve_input

    cfg = validate({"data": {"train": str(squares[0]), "image_size": 24}})
    model_cfg, values = resolve_input(cfg.data, timm.create_model("test_resnet", num_classes=3))
    assert values["data.crop_pct"] == pytest.approx(0.95)  # the model's own, for a folder
    assert cfg.data.crop_pct is None  # the validated config is read-only
    train_tf, eval_tf = build_transforms(with_values(cfg, values).data, model_cfg)
    img = splits(*squares).train[0][0]
    assert tuple(train_tf(img).shape) == (3, 24, 24)
    assert tuple(eval_tf(img).shape) == (3, 24, 24)
    digits = validate({}).data
    _, values = resolve_input(digits, timm.create_model("test_resnet", num_classes=3))
    # tiny-image dataset defaults
    assert (values["data.image_size"], values["data.crop_pct"]) == (32, 1.0)


def test_subset_seed_fixes_the_picks_across_run_seeds(tmp_path, squares):
    from conftest import small_config

    from tlkd.recipes.build import build_experiment

    def picks(seed: int, subset_seed: int | None = None) -> set[bytes]:
        data = {"samples_per_class": 3, "subset_seed": subset_seed}
        cfg = validate(small_config(tmp_path, *squares, seed=seed, data=data))
        return set(images(build_experiment(cfg, for_training=False).splits.train))

    assert picks(0) != picks(1)  # by default the run's seed picks the images
    assert picks(0, subset_seed=5) == picks(1, subset_seed=5)


def _loaders(tmp_path, squares, in_memory, **augment):
    from conftest import small_config

    from tlkd.recipes.build import build_experiment

    data = {"in_memory": in_memory, "cache_dir": str(tmp_path / "cache")}
    if augment:
        data["augment"] = augment
    cfg = validate(small_config(tmp_path, *squares, data=data))
    return cfg, build_experiment(cfg, for_training=False)


def test_worker_path_normalises_whole_batches_as_timm_does_per_image(tmp_path, squares):
    """Loader workers return uint8 images and tlkd normalises whole batches; the result is
    what timm's usual per-image transform (ToTensor, Normalize) gives, and what the in-memory
    path gives."""
    import torch
    from timm.data import create_transform

    cfg, exp = _loaders(tmp_path, squares, False)
    assert not exp.loaders.in_memory
    x, y = next(iter(exp.loaders.val))
    assert x.dtype == torch.float32 and x.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
    per_image = create_transform(
        IMAGE_SIZE, is_training=False, crop_pct=1.0, mean=exp.loaders.mean, std=exp.loaders.std
    )
    expected = torch.stack([per_image(exp.splits.val[i][0]) for i in range(8)])
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)
    _, mem = _loaders(tmp_path, squares, True)
    x_mem, y_mem = next(iter(mem.loaders.val))
    torch.testing.assert_close(x_mem, x, atol=1e-5, rtol=0)
    assert torch.equal(y_mem, y)


def test_two_views_on_the_worker_path_stack_both_views_of_each_image(tmp_path, squares):
    import torch

    from tlkd.data.pipeline import extra_loader
    from tlkd.ssl.simclr import TwoViews

    # random erasing runs per batch: both views of every image are erased independently
    fixed = dict(crop_mode="rrc", scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, color_jitter=0.0)
    cfg, exp = _loaders(tmp_path, squares, False, **fixed, re_prob=1.0)
    args = (cfg, exp.splits.train, exp.model_cfg, exp.device)
    loader = TwoViews(extra_loader(*args, train=True, in_memory=False, two_views=True))
    x, y = next(iter(loader))
    assert x.shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE) and (y == -1).all()
    assert not torch.equal(x[:8], x[8:])  # erased differently
    kept = (x[:8] == x[8:]).float().mean()
    assert 0.2 < kept < 1.0  # ... but the same images underneath
    cfg, exp = _loaders(tmp_path, squares, False, **fixed)
    args = (cfg, exp.splits.train, exp.model_cfg, exp.device)
    x, _ = next(iter(TwoViews(extra_loader(*args, train=True, in_memory=False, two_views=True))))
    torch.testing.assert_close(x[:8], x[8:])  # deterministic views: identical halves
