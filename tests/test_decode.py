"""Reduced-scale JPEG decoding on the loader-worker path (tlkd/data/decode.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tlkd.config.schema import AugmentConfig
from tlkd.data.datasets import labeled_folder
from tlkd.data.decode import DraftLoader, needed_side, with_draft


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


def test_needed_side_covers_every_view():
    # eval: the resize before the centre crop
    assert needed_side(224, 0.875, None) == 256
    # the strong policy's smallest crop (8% of the area at aspect 4/3) must still span 224 px
    strong = AugmentConfig()
    assert needed_side(224, 0.875, strong) == 915  # 224 * sqrt((4/3) / 0.08)
    none = AugmentConfig(crop_mode="rkrc", scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert needed_side(224, 1.0, none) == 224


def test_draft_decodes_at_the_largest_scale_that_keeps_the_side(jpegs):
    path = str(jpegs / "a" / "0.jpg")  # 1024 x 768
    assert DraftLoader(180).__call__(path).size == (256, 192)  # 1/4: 192 >= 180
    assert DraftLoader(200).__call__(path).size == (512, 384)  # 1/2: 1/4 would give 192
    assert DraftLoader(700).__call__(path).size == (1024, 768)  # full size
    png = jpegs / "a" / "x.png"
    Image.open(path).save(png)
    assert DraftLoader(180)(str(png)).size == (1024, 768)  # not a JPEG: decoded whole
    assert DraftLoader(180)(path).mode == "RGB"


def test_drafted_views_match_full_decodes(jpegs):
    """After the eval resize to 128 px, a 1/4-scale decode gives the full decode's picture."""
    from torchvision.transforms import Compose, PILToTensor, Resize

    ds = labeled_folder(jpegs, "data.train")
    drafted = with_draft(ds, needed_side(128, 1.0, None))
    assert drafted.base is not ds.base and ds.base.loader is not drafted.base.loader
    resize = Compose([Resize(128), PILToTensor()])
    for i in range(len(ds)):
        full, small = ds[i][0], drafted[i][0]
        assert small.size == (256, 192) and full.size == (1024, 768)
        a, b = resize(full).float(), resize(small).float()
        assert a.shape == b.shape and (a - b).abs().mean() < 2.0  # of 255
    assert drafted.targets == ds.targets


def test_jpeg_draft_off_reads_whole_files(tiny_config):
    """The setting reaches the loaders: with it off the loader is torchvision's own."""
    from tlkd.config import load_config
    from tlkd.recipes.build import build_experiment

    for on in (True, False):
        cfg = load_config(str(tiny_config(data={"in_memory": False, "jpeg_draft": on})), [])
        exp = build_experiment(cfg, dry_run=True, log=lambda m: None)
        loader = exp.loaders.train.loader.dataset.base.base.loader
        assert isinstance(loader, DraftLoader) is on
        assert torch.is_tensor(next(iter(exp.loaders.val))[0])
