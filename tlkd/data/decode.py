"""Decoding image files for the loader-worker path: JPEGs much larger than the size training
needs are decoded at a reduced scale.

libjpeg can decode at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's ``Image.draft``), which
skips most of the inverse DCT and colour conversion of a large photo; the resize that follows in
timm's transforms then starts from a smaller image. A scale is used only when the decoded image
keeps at least the pixels the transforms can sample (``needed_side``), so the views a model sees
are as sharp as from the full decode. timm and torchvision decode at full size; this is the trick
of ffcv and DALI, written here because their loaders replace the whole data path.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from PIL import Image

from tlkd.config.schema import AugmentConfig


def needed_side(image_size: int, crop_pct: float, augment: AugmentConfig | None) -> int:
    """The shorter side (px) an image needs so that no view the transforms take of it is
    upsampled: eval's resize to ``image_size / crop_pct``; training's smallest random crop
    (area ``scale[0]`` at the most extreme aspect ``ratio``, timm's rrc and rkr* modes alike)
    still covering ``image_size`` px."""
    need = image_size / crop_pct
    if augment is not None:
        low = augment.scale[0]
        aspect = max(augment.ratio[1], 1 / augment.ratio[0])
        need = max(need, image_size * math.sqrt(aspect / low))
    return math.ceil(need)


@dataclass(frozen=True)
class DraftLoader:
    """An ImageFolder ``loader``: opens ``path`` as RGB, decoding a JPEG at the largest 1/2,
    1/4 or 1/8 scale that keeps its shorter side at least ``min_side`` (PIL picks the scale)."""

    min_side: int

    def __call__(self, path: str) -> Image.Image:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.format == "JPEG":
                img.draft("RGB", (self.min_side, self.min_side))
            return img.convert("RGB")


def with_draft(ds, min_side: int):
    """``ds`` (a LabeledImages view) reading its files through a :class:`DraftLoader`; other
    datasets (in memory, torchvision's arrays) are returned as they are. The base dataset is
    copied, so views sharing it (train and a held-out val) keep their own loaders."""
    base = ds.base
    if not hasattr(base, "loader") or not hasattr(base, "samples"):
        return ds
    base = copy.copy(base)
    base.loader = DraftLoader(min_side)
    view = copy.copy(ds)
    view.base = base
    return view
