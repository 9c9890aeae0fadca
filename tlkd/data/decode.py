"""Decoding image files: JPEGs through libjpeg-turbo's own API when simplejpeg is installed,
and at a reduced scale when they are much larger than training needs.

- simplejpeg (a thin binding of libjpeg-turbo's TurboJPEG API) decodes a JPEG 2.2-2.8x faster than
  PIL on this project's machine, to the same pixels (tests/test_decode.py checks they are
  equal; CMYK files and anything simplejpeg refuses go to PIL).
- libjpeg can decode at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's ``Image.draft``), which
  skips most of the inverse DCT and colour conversion of a large photo; the resize that follows
  in timm's transforms then starts from a smaller image. A scale is used only for training
  views and only when the decoded image keeps at least the resolution every view the
  transforms can sample needs (``needed_side``): no view is upsampled where the full decode
  would have had the pixels, though the values differ slightly (DCT-domain scaling filters
  differently from PIL's resize). Eval views are always decoded whole. timm and torchvision
  decode at full size; this is the trick of ffcv and DALI, written here because their loaders
  replace the whole data path. Measured in docs/performance.md (section 10).
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass

from PIL import Image

from tlkd.config.schema import AugmentConfig

try:
    import simplejpeg
except ImportError:  # an optional speed-up: PIL decodes the same pixels
    simplejpeg = None

_SCALES = (8, 4, 2, 1)


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
class ImageLoader:
    """An ImageFolder ``loader``: the file at ``path`` as an RGB image. A JPEG is decoded at
    the largest 1/2, 1/4 or 1/8 scale that keeps its shorter side at least ``min_side`` (0:
    full size), by simplejpeg where it can, else PIL, both giving the same pixels."""

    min_side: int = 0

    def __call__(self, path: str) -> Image.Image:
        with open(path, "rb") as f:
            data = f.read()
        if simplejpeg is not None and data[:3] == b"\xff\xd8\xff":
            img = self._turbo(data)
            if img is not None:
                return img
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and self.min_side:
            img.draft("RGB", (self.min_side, self.min_side))
        return img.convert("RGB")

    def _turbo(self, data: bytes) -> Image.Image | None:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if colorspace in ("CMYK", "YCCK"):  # PIL's conversion differs: leave them to it
                return None
            limit = Image.MAX_IMAGE_PIXELS
            if limit and height * width > limit:  # PIL's decompression-bomb warning or error
                return None
            s = 1
            if self.min_side:
                s = next((s for s in _SCALES if min(height, width) // self.min_side >= s), 1)
            arr = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_height=-(-height // s), min_width=-(-width // s)
            )
        except ValueError:  # a file simplejpeg cannot read: PIL reads it or names the error
            return None
        return Image.fromarray(arr)


def with_draft(ds, min_side: int):
    """``ds`` (a LabeledImages view) reading its files through ``ImageLoader(min_side)``; other
    datasets (in memory, torchvision's arrays) are returned as they are. The base dataset is
    copied, so views sharing it (train and a held-out val) keep their own loaders."""
    base = ds.base
    if not hasattr(base, "loader") or not hasattr(base, "samples"):
        return ds
    base = copy.copy(base)
    base.loader = ImageLoader(min_side)
    view = copy.copy(ds)
    view.base = base
    return view
