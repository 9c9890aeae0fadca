"""A fixed, deterministic corruption of an image folder: the target domain of the domain
adaptation results (docs/results.md).

    python -m tlkd.data.corrupt SRC DST [--blur 1.0] [--noise 0.08] [--light 0.7] [--seed 0]

Every image under SRC (class sub-folders kept) is Gaussian-blurred (PIL, radius ``blur``),
darkened (pixel values times ``light``) and given Gaussian noise (standard deviation ``noise``
of the full range) drawn from a generator seeded by ``seed`` and the image's position in the
sorted file list, then written to DST as PNG (lossless, so the noise is kept exactly).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def corrupt(img: Image.Image, index: int, blur: float, noise: float, light: float, seed: int):
    img = img.convert("RGB").filter(ImageFilter.GaussianBlur(radius=blur))
    rng = np.random.default_rng([seed, index])
    x = np.asarray(img, dtype=np.float32) * light
    x += rng.normal(0.0, noise * 255.0, size=x.shape)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def _one(job: tuple[int, Path, Path, float, float, float, int]) -> None:
    index, src, dst, blur, noise, light, seed = job
    with Image.open(src) as img:
        out = corrupt(img, index, blur, noise, light, seed)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out.save(dst.with_suffix(".png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--blur", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.08)
    p.add_argument("--light", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    files = sorted(f for f in a.src.rglob("*") if f.suffix.lower() in EXTENSIONS)
    jobs = [
        (i, f, a.dst / f.relative_to(a.src), a.blur, a.noise, a.light, a.seed)
        for i, f in enumerate(files)
    ]
    with ProcessPoolExecutor(a.workers) as pool:
        list(pool.map(_one, jobs, chunksize=256))
    print(f"{len(files)} images -> {a.dst}")


if __name__ == "__main__":
    main()
