"""The in-memory data path: batch augmentation, the decoded-image cache, the automatic choice."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import error_line, small_config, write_images
from PIL import Image

from tlkd.config.schema import AugmentConfig, DataConfig
from tlkd.data import memory
from tlkd.data.batch_aug import BatchAugment
from tlkd.data.datasets import LabeledImages, build_splits
from tlkd.data.ragged import Ragged

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _images(n=6, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _identity(n):
    return torch.tensor([[0.5, 0.5, 1.0, 1.0, 0, 0, 1, 1, 1, 0]] * n)


def test_identity_view_is_the_normalised_image_and_flips_mirror_it():
    x = _images()
    aug = BatchAugment(AugmentConfig(color_jitter=0.0), 12, MEAN, STD)
    expected = (x.float() / 255 - 0.5) / 0.25
    out = aug.apply(x, _identity(len(x)))
    assert out.dtype == torch.float32 and out.shape == (6, 3, 12, 12)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    flipped = _identity(len(x))
    flipped[::2, 4] = 1  # every other image mirrored left-right
    out = aug.apply(x, flipped)
    torch.testing.assert_close(out[::2], expected[::2].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1::2], expected[1::2], atol=1e-5, rtol=0)
    # the top-left quarter's box at half the size: exactly those pixels
    quarter = _identity(len(x))
    quarter[:, :4] = torch.tensor([0.25, 0.25, 0.5, 0.5])
    out = BatchAugment(AugmentConfig(color_jitter=0.0), 6, MEAN, STD).apply(x, quarter)
    torch.testing.assert_close(out, expected[..., :6, :6], atol=1e-5, rtol=0)


def test_sampled_crops_respect_scale_ratio_and_flip_probability():
    g = torch.Generator().manual_seed(0)
    rrc = BatchAugment(AugmentConfig(scale=(0.25, 0.5), hflip=0.5, color_jitter=0.4), 32, MEAN, STD)
    p = rrc.sample(4000, 32, 32, g)
    area = p[:, 2] * p[:, 3]
    assert area.min() > 0.2 and area.max() < 0.56  # pixel rounding around [0.25, 0.5]
    assert (p[:, 0] - p[:, 2] / 2).min() >= 0 and (p[:, 0] + p[:, 2] / 2).max() <= 1
    assert 0.45 < p[:, 4].mean() < 0.55 and p[:, 5].sum() == 0
    assert p[:, 6:9].min() >= 0.6 - 1e-6 and p[:, 6:9].max() <= 1.4 + 1e-6
    rkrr = BatchAugment(AugmentConfig(crop_mode="rkrr", scale=(0.5, 1.0)), 32, MEAN, STD)
    p = rkrr.sample(4000, 32, 32, g)
    # timm's rkrr: a random area zoom (half the time) and aspect change (half the time); the
    # aspect change alone can make one side longer than the image (reflect-padded)
    w = p[:, 2]
    assert 0.4 < (w < 0.99).float().mean() < 0.8 and 0.18 < (w == 1).float().mean() < 0.32
    assert w.min() > 1 / (2**0.5 * (4 / 3) ** 0.5) - 0.05 and w.max() < (4 / 3) ** 0.5 + 0.05


def _smooth(n=3, h=60, w=80, seed=0):
    """Photo-like uint8 images (a blurred noise field): resampling errors stay small."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h // 4, w // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_views_of_large_images_parity_with_pil_crop_and_resize(mode):
    """Images larger than the view are cut and resized one by one (CPU): each view equals
    PIL's crop + antialiased resize, timm's per-image path (timm/data/transforms.py
    RandomResizedCropAndInterpolation: ``F.resized_crop`` on a PIL image), to a grey level."""
    from PIL import Image

    x = _smooth()
    aug = BatchAugment(AugmentConfig(color_jitter=0.0), 24, (0, 0, 0), (1, 1, 1), mode)
    boxes = [(10, 4, 40, 30), (0, 0, 80, 60), (33, 17, 47, 43)]  # left, top, width, height
    params = _identity(3)
    for i, (left, top, bw, bh) in enumerate(boxes):
        params[i, :4] = torch.tensor([(left + bw / 2) / 80, (top + bh / 2) / 60, bw / 80, bh / 60])
    params[2, 4] = 1  # the last one mirrored
    out = (aug.apply(x, params) * 255).round()
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[mode]
    for i, (left, top, bw, bh) in enumerate(boxes):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        ref = pil.crop((left, top, left + bw, top + bh)).resize((24, 24), resample)
        if i == 2:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
        assert (out[i] - ref).abs().max() <= 1, i
    # the same views through an index into the stored images (no gather of whole images)
    idx = torch.tensor([2, 0])
    torch.testing.assert_close(
        aug.apply(x, params[[2, 0]], idx), aug.apply(x[idx], params[[2, 0]]), atol=0, rtol=0
    )


def test_a_box_past_the_edge_is_zero_padded_on_large_images():
    """timm's RandomCropOrPad pads with zeros: so does the per-image path."""
    x = torch.full((1, 3, 40, 40), 200, dtype=torch.uint8)
    aug = BatchAugment(AugmentConfig(crop_mode="rkrc", color_jitter=0.0), 20, (0,) * 3, (1,) * 3)
    params = _identity(1)
    params[0, :4] = torch.tensor([0.5, 0.5, 2.0, 1.0])  # twice the width: padded left and right
    out = aug.apply(x, params)[0]
    assert out[:, :, :4].max() == 0 and out[:, :, -4:].max() == 0
    inside = torch.full((3, 20, 8), 200 / 255)
    torch.testing.assert_close(out[:, :, 6:14], inside, atol=1e-6, rtol=0)


def test_color_jitter_changes_brightness_within_bounds():
    x = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    aug = BatchAugment(AugmentConfig(color_jitter=0.5), 4, (0, 0, 0), (1, 1, 1))
    params = _identity(2)
    params[0, 6] = 1.5  # brighter
    out = aug.apply(x, params)
    torch.testing.assert_close(out[0], torch.full((3, 4, 4), 150 / 255), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.full((3, 4, 4), 100 / 255), atol=1e-5, rtol=0)


def _dataset(root) -> LabeledImages:
    return build_splits(DataConfig(dataset="folder", train=root, val=root), 0).train


def test_decoded_images_are_cached_and_invalidated_when_a_file_changes(tmp_path):
    root = write_images(tmp_path / "imgs", per_class=3)
    ds = _dataset(root)
    logs: list[str] = []
    first = memory.load_images(ds, None, "train", tmp_path / "cache", 0, logs.append)
    assert first.shape == (9, 3, 16, 16) and first.dtype == torch.uint8 and len(logs) == 1
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 1
    again = memory.load_images(ds, None, "train", tmp_path / "cache", 0, logs.append)
    assert torch.equal(first, again) and len(logs) == 1  # read back, not decoded
    # the decoded pixels are the files' pixels
    img, _ = ds[4]
    assert torch.equal(first[4], torch.from_numpy(np.array(img)).permute(2, 0, 1))
    changed = ds.path(0)
    write_images(tmp_path / "other", classes=("blue",), per_class=1, seed=9)
    os.replace(tmp_path / "other" / "blue" / "000.png", changed)
    third = memory.load_images(ds, None, "train", tmp_path / "cache", 0, logs.append)
    assert len(logs) == 2 and not torch.equal(third[0], first[0])


def test_images_of_mixed_sizes_raise_not_uniform(tmp_path):
    root = write_images(tmp_path / "imgs", per_class=2)
    write_images(tmp_path / "imgs", classes=("red",), per_class=1, size=20, seed=5)
    with pytest.raises(memory.NotUniform):
        memory.load_images(_dataset(root), None, "train", tmp_path / "cache", 0)


def test_a_size_per_image_samples_like_one_size_and_keeps_boxes_inside():
    """sample() with a size per image draws what one shared size draws (same generator), and
    with sizes that differ each rrc box lies in its own image at the configured area."""
    for mode in ("rrc", "rkrr", "rkrc"):
        aug = BatchAugment(AugmentConfig(crop_mode=mode, scale=(0.3, 0.9)), 16, MEAN, STD)
        one = aug.sample(64, 30, 40, torch.Generator().manual_seed(1))
        h, w = torch.full((64,), 30.0), torch.full((64,), 40.0)
        each = aug.sample(64, h, w, torch.Generator().manual_seed(1))
        torch.testing.assert_close(each, one, atol=1e-6, rtol=0)  # float32 rounding
    aug = BatchAugment(AugmentConfig(scale=(0.3, 0.9), ratio=(0.75, 1.33)), 16, MEAN, STD)
    h = torch.tensor([30.0, 300.0, 20.0, 90.0]).repeat(500)
    w = torch.tensor([40.0, 100.0, 80.0, 90.0]).repeat(500)
    p = aug.sample(len(h), h, w, torch.Generator().manual_seed(2))
    assert (p[:, 0] - p[:, 2] / 2).min() >= 0 and (p[:, 0] + p[:, 2] / 2).max() <= 1 + 1e-6
    assert (p[:, 1] - p[:, 3] / 2).min() >= 0 and (p[:, 1] + p[:, 3] / 2).max() <= 1 + 1e-6
    # a box of a tall image is tall in pixels only within the allowed aspect ratio
    aspect = (p[:, 2] * w) / (p[:, 3] * h)
    drawn = p[:, 2] * p[:, 3] < 0.999  # not the whole-image fallback
    assert aspect[drawn].min() > 0.7 and aspect[drawn].max() < 1.4
    area = p[:, 2] * p[:, 3]
    assert area[drawn].min() > 0.25 and area[drawn].max() < 0.95


def test_rrc_boxes_parity_with_torchvision_get_params():
    """The boxes drawn for images of several sizes follow torchvision's
    RandomResizedCrop.get_params (torchvision/transforms/transforms.py, which timm's rrc
    calls) for each size: area fraction, log aspect and position, by their means and spreads
    over 4,000 draws (the two draw from different random streams)."""
    from torchvision.transforms import RandomResizedCrop

    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    aug = BatchAugment(AugmentConfig(scale=scale, ratio=ratio), 16, MEAN, STD)
    sizes = [(30, 40), (300, 100), (64, 64)]
    n = 4000
    h = torch.tensor([float(a) for a, _ in sizes]).repeat_interleave(n)
    w = torch.tensor([float(b) for _, b in sizes]).repeat_interleave(n)
    ours = aug.sample(len(h), h, w, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    for k, (height, width) in enumerate(sizes):
        img = torch.zeros(1, height, width)
        ref = torch.tensor([RandomResizedCrop.get_params(img, scale, ratio) for _ in range(n)])
        top, left, bh, bw = ref.double().unbind(1)
        theirs = torch.stack(
            [(left + bw / 2) / width, (top + bh / 2) / height, bw / width, bh / height], 1
        )
        mine = ours[k * n : (k + 1) * n, :4].double()
        for stat in (
            lambda b: b[:, 2] * b[:, 3],  # area fraction
            lambda b, hw=height / width: torch.log(b[:, 2] / b[:, 3] / hw),  # pixel aspect
            lambda b: b[:, 0],  # centre x
            lambda b: b[:, 1],  # centre y
        ):
            a, b = stat(mine), stat(theirs)
            assert abs(a.mean() - b.mean()) < 0.025, (sizes[k], a.mean(), b.mean())
            assert abs(a.std() - b.std()) < 0.025, (sizes[k], a.std(), b.std())


def _mixed_folder(root):
    """A class folder of 16 px squares and one of 24 x 18 px images: two sizes."""
    write_images(root, classes=("red", "green"), per_class=3)
    for i in range(3):
        rgb = np.random.default_rng(i).integers(0, 256, (18, 24, 3), dtype=np.uint8)
        (root / "blue").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(root / "blue" / f"{i}.png")
    return root


def test_images_of_several_sizes_are_stored_ragged_cached_and_mapped(tmp_path, monkeypatch):
    root = _mixed_folder(tmp_path / "imgs")
    ds = _dataset(root)
    logs: list[str] = []
    store = memory.load_images(ds, None, "train", tmp_path / "cache", 0, logs.append, ragged=True)
    assert isinstance(store, Ragged) and len(store) == 9
    for i in range(9):  # each image its own pixels, at its own size
        img, _ = ds[i]
        assert torch.equal(store[i], torch.from_numpy(np.array(img)).permute(2, 0, 1))
    h, w = store.sizes()
    assert sorted(set(zip(h.tolist(), w.tolist(), strict=True))) == [(16.0, 16.0), (18.0, 24.0)]
    decoded = len(logs)
    again = memory.load_images(ds, None, "train", tmp_path / "cache", 0, logs.append, ragged=True)
    assert len(logs) == decoded and torch.equal(again.data, store.data)  # read back
    mapped_files: list = []
    real_memmap = np.memmap
    monkeypatch.setattr(
        np, "memmap", lambda *a, **k: mapped_files.append(a[0]) or real_memmap(*a, **k)
    )
    mapped = memory.load_images(
        ds, None, "train", tmp_path / "cache", 0, logs.append, mapped=True, ragged=True
    )
    assert len(logs) == decoded and [p.suffix for p in mapped_files] == [".u8"]
    assert torch.equal(mapped.data, store.data)
    # views: each image's box cut and resized at its own size, as PIL would
    aug = BatchAugment(AugmentConfig(color_jitter=0.0), 8, (0,) * 3, (1,) * 3)
    params = _identity(2)
    params[:, :4] = torch.tensor([0.5, 0.5, 0.5, 0.5])  # the central half of each side
    idx = torch.tensor([0, 8])  # a 16 px square and a 24 x 18 image
    out = (aug.apply(store, params, idx) * 255).round()
    for k, i in enumerate(idx.tolist()):
        img, _ = ds[i]
        width, height = img.size
        box = (width // 4, height // 4, width // 4 + width // 2, height // 4 + height // 2)
        ref = np.array(img.crop(box).resize((8, 8), Image.BILINEAR))
        assert (out[k] - torch.from_numpy(ref).permute(2, 0, 1).float()).abs().max() <= 1


def test_a_folder_of_several_sizes_trains_in_memory_and_mapped_alike(
    tmp_path, write_config, run_cli, monkeypatch
):
    """A folder whose images differ in size takes the in-memory path (auto), and its
    memory-mapped form learns exactly what the in-memory one learns."""
    from safetensors.torch import load_file

    root = _mixed_folder(tmp_path / "imgs")
    cfg = small_config(tmp_path, root, root, train={"epochs": 2, "batch_size": 4})
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    proc = run_cli("finetune", write_config(cfg, "ram.yaml"), "experiment=ram")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "runs" / "ram" / "summary.json").read_text())
    assert summary["data_path"].startswith("in memory") and "several sizes" in summary["data_path"]
    cfg["data"]["cache_dir"] = str(tmp_path / "cache2")
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)  # bytes: nothing fits
    proc = run_cli("finetune", write_config(cfg, "mapped.yaml"), "experiment=mapped")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "runs" / "mapped" / "summary.json").read_text())
    assert summary["data_path"].startswith("memory-mapped") and "several" in summary["data_path"]
    assert len(list((tmp_path / "cache2" / "images").glob("*.ragged.u8"))) == 1
    a = load_file(tmp_path / "runs" / "ram" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "mapped" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_room_for_a_ragged_store_falls_back_at_once(tmp_path, monkeypatch):
    """A cache disk without room for images of several sizes: memory-mapping fails before
    any decoding (the run then takes loader workers); in memory they are kept uncached."""
    import shutil

    root = _mixed_folder(tmp_path / "imgs")
    ds = _dataset(root)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))
    logs: list[str] = []
    with pytest.raises(OSError, match="No space left"):
        memory.load_images(ds, None, "t", tmp_path / "cache", 0, logs.append, True, ragged=True)
    assert not list((tmp_path / "cache" / "images").glob("*.ragged.*"))
    store = memory.load_images(ds, None, "t", tmp_path / "cache", 0, logs.append, ragged=True)
    assert isinstance(store, Ragged) and len(store) == 9
    assert "could not cache the decoded images" in logs[-1]


def test_loader_replays_an_epoch_from_its_generator_state(tmp_path):
    x = _images(n=20, size=16)
    aug = BatchAugment(AugmentConfig(), 16, MEAN, STD)
    g = torch.Generator().manual_seed(3)
    loader = memory.MemoryLoader(
        x, torch.arange(20), list(range(20)), 8, MEAN, STD, aug, g, drop_last=True
    )
    assert len(loader) == 2
    state = g.get_state()
    first = [b for b, _ in loader]
    g.set_state(state)
    second = [b for b, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], next(iter(loader))[0])  # the next epoch differs


def test_runs_choose_the_data_path_and_say_why(tmp_path, squares, write_config, run_cli):
    train, val = squares
    cfg = small_config(tmp_path, train, val, train={"epochs": 1})
    proc = run_cli("finetune", write_config(cfg, "auto.yaml"), "experiment=auto")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "runs" / "auto" / "summary.json").read_text())
    assert summary["data_path"].startswith("in memory")
    assert "in memory" in proc.stdout
    # per-image augmentation: auto falls back to loader workers, saying why
    cfg["data"]["augment"] = {"auto_augment": "rand-m9-mstd0.5"}
    proc = run_cli("finetune", write_config(cfg, "aa.yaml"), "experiment=aa")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "runs" / "aa" / "summary.json").read_text())
    assert "workers" in summary["data_path"] and "auto_augment" in summary["data_path"]
    # ... and in_memory: true makes that an error naming the key
    proc = run_cli("finetune", write_config(cfg, "aa.yaml"), "data.in_memory=true")
    assert proc.returncode == 2
    assert error_line(proc).startswith("error: data.in_memory: cannot hold the data in memory")
    saved = yaml.safe_load((tmp_path / "runs" / "aa" / "config.yaml").read_text())
    assert saved["data"]["in_memory"] == "auto"


def test_data_over_the_memory_budget_are_memory_mapped_and_train_the_same(
    tmp_path, squares, write_config, run_cli, monkeypatch
):
    """Over the budget, the decoded images live in the cache folder as a memory-mapped file
    (never read whole into memory) and the run learns exactly what the in-memory run learns."""
    from safetensors.torch import load_file

    train, val = squares
    cfg = small_config(tmp_path, train, val, train={"epochs": 2})
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    assert run_cli("finetune", write_config(cfg, "ram.yaml"), "experiment=ram").returncode == 0
    # a fresh cache folder: the mapped run decodes again, straight into its file
    cfg["data"]["cache_dir"] = str(tmp_path / "cache2")
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)  # bytes: nothing fits
    loaded = []
    real_load = np.load
    monkeypatch.setattr(
        np, "load", lambda *a, **k: loaded.append(k.get("mmap_mode")) or real_load(*a, **k)
    )
    proc = run_cli("finetune", write_config(cfg, "mapped.yaml"), "experiment=mapped")
    assert proc.returncode == 0, proc.stderr
    assert "to a memory-mapped file" in proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "runs" / "mapped" / "summary.json").read_text())
    assert summary["data_path"].startswith("memory-mapped from the cache folder")
    assert loaded == ["c", "c"]  # train and val, each mapped from its file
    assert len(list((tmp_path / "cache2" / "images").glob("*.npy"))) == 2
    a = load_file(tmp_path / "runs" / "ram" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "mapped" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # no cache folder to map from: the loader workers, saying why
    monkeypatch.setattr(memory, "usable_cache_dir", lambda configured: None)
    proc = run_cli("finetune", write_config(cfg, "nocache.yaml"), "experiment=nocache")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "runs" / "nocache" / "summary.json").read_text())
    assert "workers" in summary["data_path"] and "no usable cache folder" in summary["data_path"]


def test_evaluation_only_data_over_the_budget_are_memory_mapped(tmp_path, squares, monkeypatch):
    """No training images (evaluate's data.val alone) and data over the budget: the val
    images are mapped, the empty train split is no obstacle."""
    from tlkd.config import load_config
    from tlkd.recipes.build import build_experiment

    _, val = squares
    cfg = small_config(tmp_path, None, val)
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    exp = build_experiment(load_config(str(path), []), for_training=False, log=lambda m: None)
    assert exp.loaders.note.startswith("memory-mapped from the cache folder")
    images, targets = next(iter(exp.loaders.val))
    assert images.shape[1:] == (3, 16, 16) and len(targets) == len(images)
