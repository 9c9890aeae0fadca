"""Training augmentation on whole batches of uint8 tensors (the in-memory data path).

timm's transforms work on one PIL image at a time in DataLoader workers; on a small machine
those workers compete with the model for the cores. Here every random choice of timm's
crop modes (``rrc``, ``rkrc``, ``rkrr``), the flips, the brightness/contrast/saturation
jitter and random greyscale is drawn per image as a row of numbers (``sample``), and the views
are then cut out and resized (``apply``): on a CPU image by image with torch's uint8 resize
kernels (antialiased, as PIL resizes: 3.5x faster than resampling the whole float batch when
the stored images are larger than the view, measured in docs/performance.md section 10), on
an accelerator for the whole batch with one ``grid_sample`` call; the colour changes are a
few tensor ops on the batch. torch and torchvision have no batched, per-image-parameter
version of these transforms, hence this module. Keeping the parameters explicit also lets
the teacher cache store a view as a row.

Differences from the PIL path, all small: boxes rounded to whole source pixels (CPU) or
sampled at sub-pixel positions without antialiasing and with reflection padding
(``grid_sample``), and jitter applied in a fixed order (brightness, contrast, saturation)
instead of a random one, then the random grey.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tlkd.config.schema import AugmentConfig
from tlkd.data.ragged import Ragged

# params columns: box centre x, y and size w, h as fractions of the source image, then
# horizontal flip, vertical flip (0/1), the brightness, contrast, saturation factors and
# grey (0/1)
N_PARAMS = 10
Size = int | torch.Tensor  # one image size for the batch, or a float tensor (n,) of them
_GRID_MODE = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def unsupported(aug: AugmentConfig) -> str | None:
    """Why ``aug`` cannot run on batches (None when it can)."""
    if aug.auto_augment:
        return "data.augment.auto_augment runs per image"
    if aug.re_prob > 0:
        return "data.augment.re_prob (random erasing) runs per image"
    return None


@dataclass
class BatchAugment:
    """Random crop/resize, flips and colour jitter of a uint8 NCHW batch, then normalisation."""

    aug: AugmentConfig
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def sample(self, n: int, height: Size, width: Size, g: torch.Generator) -> torch.Tensor:
        """Parameters of ``n`` random views of ``height`` x ``width`` images (one size for all,
        or a float tensor (n,) each: images of several sizes): (n, N_PARAMS)."""
        aug = self.aug
        if aug.crop_mode == "rrc":
            box = _rrc_boxes(n, height, width, aug.scale, aug.ratio, g)
        else:
            box = _rkr_boxes(n, height, width, self.size, aug, g)
        flips = torch.rand(n, 2, generator=g) < torch.tensor([aug.hflip, aug.vflip])
        cj = aug.color_jitter
        jitter = 1 + (2 * torch.rand(n, 3, generator=g) - 1) * cj
        grey = torch.rand(n, 1, generator=g) < aug.grayscale
        return torch.cat([box, flips.float(), jitter.clamp_min(0), grey.float()], dim=1)

    def apply(
        self,
        images: torch.Tensor | Ragged,
        params: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Views of uint8 ``images`` (N, C, H, W) or Ragged, or of ``images[index]``, given by
        ``params``: normalised float32. Images larger than the view, or of several sizes, are
        cut and resized one by one on a CPU (no copy of the whole images); otherwise the batch
        is resampled at once."""
        if isinstance(images, Ragged) or (
            images.device.type == "cpu" and images.shape[-2] * images.shape[-1] > self.size**2
        ):
            rows = index.tolist() if index is not None else range(len(images))
            x = _resize_each(images, rows, params, self.size, self.interpolation)
            x = x.float().div_(255)
        else:
            x = images if index is None else images[index.to(images.device)]
            params = params.to(x.device)
            x = _resample_batch(x.float().div_(255), params, self.size, self.interpolation)
        if self.aug.color_jitter > 0:
            x = _jitter(x, params[:, 6:9])
        if self.aug.grayscale > 0:
            grey = params[:, 9].view(-1, 1, 1, 1) > 0.5
            x = torch.where(grey, _gray(x), x)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)


def _resize_each(
    images: torch.Tensor | Ragged, rows: Sequence[int], params: torch.Tensor, size: int, mode: str
) -> torch.Tensor:
    """Box ``i`` of ``params`` cut from the uint8 image ``images[rows[i]]`` (rounded to whole
    pixels, zeros where it extends past the image, as timm's RandomCropOrPad pads) and resized
    to ``size`` by torch's uint8 kernels, then flipped: uint8 (len(rows), C, size, size)."""
    if isinstance(images, Ragged):
        heights, widths = images.sizes(torch.as_tensor(list(rows), dtype=torch.long))
        c = images[rows[0]].shape[0] if len(rows) else 3
    else:
        _, c, h, w = images.shape
        heights, widths = torch.full((len(rows),), float(h)), torch.full((len(rows),), float(w))
    out = torch.empty(len(rows), c, size, size, dtype=torch.uint8)
    scale = torch.stack([widths, heights, widths, heights], 1).double()
    boxes = params[:, :4].double() * scale
    bw, bh = boxes[:, 2].round().clamp_min(1), boxes[:, 3].round().clamp_min(1)
    left = (boxes[:, 0] - bw / 2).round()
    top = (boxes[:, 1] - bh / 2).round()
    pixel_boxes = torch.stack([top, left, bh, bw], 1).long().tolist()
    interp = {"mode": mode, "antialias": mode != "nearest"}
    if mode != "nearest":
        interp["align_corners"] = False
    for i, (row, (top, lft, h, w)) in enumerate(zip(rows, pixel_boxes, strict=True)):
        image = images[row]
        height, width = image.shape[1:]
        t0, l0 = max(top, 0), max(lft, 0)
        t1, l1 = min(top + h, height), min(lft + w, width)
        crop = image[:, t0:t1, l0:l1]
        if (t1 - t0, l1 - l0) != (h, w):  # a box past the edges: zero padding
            pad = (l0 - lft, lft + w - l1, t0 - top, top + h - t1)
            crop = F.pad(crop, tuple(max(p, 0) for p in pad))
        # channels-last uint8 is the layout torch's vectorised resize kernels take
        crop = crop.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        out[i] = F.interpolate(crop, size=(size, size), **interp)[0]
    flip = params[:, 4:6] > 0.5
    if flip[:, 0].any():
        out[flip[:, 0]] = out[flip[:, 0]].flip(-1)
    if flip[:, 1].any():
        out[flip[:, 1]] = out[flip[:, 1]].flip(-2)
    return out


def _resample_batch(x: torch.Tensor, params: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """The views of float ``x`` by one ``grid_sample`` over the batch (sub-pixel boxes,
    reflection padding, no antialiasing): what suits an accelerator."""
    cx, cy, w, h, hf, vf = params[:, :6].unbind(1)
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    # output pixel (u, v) in [-1, 1] samples the box: centre + half size, mirrored by flips
    theta[:, 0, 0] = w * (1 - 2 * hf)
    theta[:, 1, 1] = h * (1 - 2 * vf)
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
    return F.grid_sample(
        x, grid, mode=_GRID_MODE[mode], padding_mode="reflection", align_corners=False
    )


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NCHW -> normalised float32 (the eval path: images are stored already resized)."""
    x = images.float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _boxes(top: torch.Tensor, left: torch.Tensor, bh: torch.Tensor, bw: torch.Tensor, h, w):
    """(cx, cy, w, h) as fractions of the image from a pixel box (may extend outside)."""
    return torch.stack([(left + bw / 2) / w, (top + bh / 2) / h, bw / w, bh / h], dim=1)


def _rrc_boxes(n, height: Size, width: Size, scale, ratio, g, tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, for ``n`` images at once."""
    several = torch.is_tensor(height)  # a size per image
    hh, ww = (height[:, None], width[:, None]) if several else (height, width)
    area = hh * ww
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=g))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, tries, generator=g))
    bw = torch.sqrt(target * aspect).round()
    bh = torch.sqrt(target / aspect).round()
    ok = (bw > 0) & (bw <= ww) & (bh > 0) & (bh <= hh)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    # fallback when no try fits: the whole image, cropped to the nearest allowed ratio
    in_ratio = width / height
    if several:
        fw = torch.where(in_ratio > max(ratio), (height * max(ratio)).round(), width)
        fh = torch.where(in_ratio < min(ratio), (width / min(ratio)).round(), height)
    elif in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    rows = torch.arange(n)
    pick = first.clamp_min(0)
    bw = torch.where(first >= 0, bw[rows, pick], torch.as_tensor(fw, dtype=torch.float32))
    bh = torch.where(first >= 0, bh[rows, pick], torch.as_tensor(fh, dtype=torch.float32))
    u = torch.rand(n, 2, generator=g)
    top = torch.where(first >= 0, (u[:, 0] * (height - bh + 1)).floor(), (height - bh) // 2)
    left = torch.where(first >= 0, (u[:, 1] * (width - bw + 1)).floor(), (width - bw) // 2)
    return _boxes(top, left, bh, bw, height, width)


def _rkr_boxes(n, height: Size, width: Size, size, aug: AugmentConfig, g) -> torch.Tensor:
    """timm's ResizeKeepRatio (random scale and aspect, each with probability 0.5) followed by
    RandomCropOrPad (``rkrr``) or CenterCropOrPad (``rkrc``), as a box in the source image."""
    if torch.is_tensor(height):
        ratio = torch.minimum(height / size, width / size)
    else:
        ratio = min(height / size, width / size)
    u = torch.rand(n, 6, generator=g)
    s_lo, s_hi = aug.scale
    factor = torch.where(u[:, 0] < 0.5, 1 / torch.sqrt(s_lo + (s_hi - s_lo) * u[:, 1]), 1.0)
    a_lo, a_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    aspect = torch.where(u[:, 2] < 0.5, torch.exp((a_lo + (a_hi - a_lo) * u[:, 3]) / 2), 1.0)
    rh = (height * factor / aspect / ratio).round().clamp_min(1)  # the resized image
    rw = (width * factor * aspect / ratio).round().clamp_min(1)
    dh, dw = rh - size, rw - size
    if aug.crop_mode == "rkrr":
        top = torch.sign(dh) * (u[:, 4] * (dh.abs() + 1)).floor()
        left = torch.sign(dw) * (u[:, 5] * (dw.abs() + 1)).floor()
    else:
        top, left = (dh / 2).round(), (dw / 2).round()
    # output rows top..top+size of the resized image, in source pixels
    sy, sx = height / rh, width / rw
    return _boxes(top * sy, left * sx, size * sy, size * sx, height, width)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation blends as torchvision defines them, per image."""
    b, c, s = (f.view(-1, 1, 1, 1) for f in factors.unbind(1))
    x = (x * b).clamp_(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (c * x + (1 - c) * mean).clamp_(0, 1)
    return (s * x + (1 - s) * _gray(x)).clamp_(0, 1)
