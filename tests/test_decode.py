"""Image decoding on the loader-worker path (tlkd/data/decode.py): simplejpeg gives PIL's
pixels, and JPEGs are decoded at a reduced scale only where no sampled view loses pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

from tlkd.config.schema import AugmentConfig
from tlkd.data import decode
from tlkd.data.datasets import labeled_folder
from tlkd.data.decode import ImageLoader, needed_side, with_draft


def _photo(size: int, seed: int) -> Image.Image:
    """A smooth photo-like RGB image (low-frequency content survives JPEG at any scale)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size * 3 // 4), Image.BICUBIC)


@pytest.fixture
def jpegs(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            _photo(1024, seed=i + (c == "b") * 10).save(tmp_path / c / f"{i}.jpg", quality=92)
    return tmp_path


@pytest.fixture(params=["simplejpeg", "pil"])
def decoder(request, monkeypatch):
    """Every loader test runs with simplejpeg and with PIL alone (simplejpeg missing)."""
    if request.param == "pil":
        monkeypatch.setattr(decode, "simplejpeg", None)
    else:
        assert decode.simplejpeg is not None  # a base dependency
    return request.param


def test_needed_side_covers_every_view():
    # eval: the resize before the centre crop
    assert needed_side(224, 0.875, None) == 256
    # the strong policy's smallest crop (8% of the area at aspect 4/3) must still span 224 px
    strong = AugmentConfig()
    assert needed_side(224, 0.875, strong) == 915  # 224 * sqrt((4/3) / 0.08)
    none = AugmentConfig(crop_mode="rkrc", scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert needed_side(224, 1.0, none) == 224


def test_decodes_at_the_largest_scale_that_keeps_the_side(jpegs, decoder):
    path = str(jpegs / "a" / "0.jpg")  # 1024 x 768
    assert ImageLoader(180)(path).size == (256, 192)  # 1/4: 192 >= 180
    assert ImageLoader(200)(path).size == (512, 384)  # 1/2: 1/4 would give 192
    assert ImageLoader(700)(path).size == (1024, 768)  # full size
    assert ImageLoader(5000)(path).size == (1024, 768)  # smaller than asked: full size
    assert ImageLoader()(path).size == (1024, 768)
    png = jpegs / "a" / "x.png"
    Image.open(path).save(png)
    assert ImageLoader(180)(str(png)).size == (1024, 768)  # not a JPEG: decoded whole
    assert ImageLoader(180)(path).mode == "RGB"


def test_simplejpeg_gives_pils_pixels(jpegs, tmp_path):
    """Full and reduced-scale decodes, colour, grey and progressive files: equal to PIL's;
    a truncated file fails as PIL fails."""
    src = _photo(640, seed=3)
    files = {"rgb": {}, "grey": {}, "progressive": {"progressive": True}}
    for name, kw in files.items():
        (src.convert("L") if name == "grey" else src).save(tmp_path / f"{name}.jpg", **kw)
    for name in files:
        path = str(tmp_path / f"{name}.jpg")
        for side in (0, 150):
            ours = np.asarray(ImageLoader(side)(path))
            with Image.open(path) as img:
                if side:
                    img.draft("RGB", (side, side))
                theirs = np.asarray(img.convert("RGB"))
            assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (name, side)
    src.convert("CMYK").save(tmp_path / "cmyk.jpg")  # left to PIL: its own conversion
    with Image.open(tmp_path / "cmyk.jpg") as img:
        assert np.array_equal(
            np.asarray(ImageLoader()(str(tmp_path / "cmyk.jpg"))), img.convert("RGB")
        )
    data = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        ImageLoader()(str(tmp_path / "cut.jpg"))


def test_drafted_views_match_full_decodes(jpegs, decoder):
    """After the eval resize to 128 px, a 1/4-scale decode gives the full decode's picture."""
    from torchvision.transforms import Compose, PILToTensor, Resize

    ds = labeled_folder(jpegs, "data.train")
    drafted = with_draft(ds, needed_side(128, 1.0, None))
    assert drafted.base is not ds.base and ds.base.loader.min_side == 0
    resize = Compose([Resize(128), PILToTensor()])
    for i in range(len(ds)):
        full, small = ds[i][0], drafted[i][0]
        assert small.size == (256, 192) and full.size == (1024, 768)
        a, b = resize(full).float(), resize(small).float()
        assert a.shape == b.shape and (a - b).abs().mean() < 2.0  # of 255
    assert drafted.targets == ds.targets


def test_jpeg_draft_reaches_training_images_only(tiny_config):
    """The setting reaches the training loader (off: full decodes); eval views are always
    decoded whole."""
    from tlkd.config import load_config
    from tlkd.recipes.build import build_experiment

    for on in (True, False):
        cfg = load_config(str(tiny_config(data={"in_memory": False, "jpeg_draft": on})), [])
        exp = build_experiment(cfg, dry_run=True, log=lambda m: None)
        loader = exp.loaders.train.loader.dataset.base.base.loader
        assert isinstance(loader, ImageLoader) and (loader.min_side > 0) is on
        assert exp.loaders.val.loader.dataset.base.base.loader.min_side == 0
        assert torch.is_tensor(next(iter(exp.loaders.val))[0])


def test_in_memory_store_holds_training_jpegs_at_the_reduced_scale(jpegs, tmp_path_factory):
    """The in-memory path stores training JPEGs decoded like the loader workers' (1024 x 768
    px files at 1/8 scale: 96 px still cover the 53 px short side 32 px views at scale 0.5
    need), val views whole-decoded then resized; off: full size."""
    from tlkd.config.schema import Config
    from tlkd.data.datasets import build_splits
    from tlkd.data.pipeline import build_loaders

    model_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 32, 32)}
    for draft, side in ((True, 128), (False, 1024)):
        cfg = Config.model_validate({
            "model": {"name": "resnet20"},
            "data": {
                "train": str(jpegs), "val": str(jpegs), "image_size": 32, "crop_pct": 1.0,
                "in_memory": True, "jpeg_draft": draft, "interpolation": "bilinear",
                "cache_dir": str(tmp_path_factory.mktemp("cache")),
                "augment": {"scale": [0.5, 1.0]}, "num_workers": 0,
            },
            "train": {"batch_size": 2},
        })  # fmt: skip
        loaders = build_loaders(cfg, build_splits(cfg.data, 0), model_cfg, torch.device("cpu"))
        assert needed_side(32, 1.0, cfg.data.augment) == 53
        assert loaders.train.images.shape[2:] == (side * 3 // 4, side)
        assert loaders.val.images.shape[2:] == (32, 32)
        x, _ = next(iter(loaders.train))
        assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()
