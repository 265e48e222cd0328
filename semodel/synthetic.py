"""A small generated ImageFolder for the demo: textures that a CNN tells apart in a few epochs.

Classes: ``checkers`` (a rotated checkerboard), ``spots`` (random discs) and ``stripes``
(parallel bands at a random angle and frequency), each in two random colours of clearly
different brightness, with noise,
saved as JPEG, so the demo exercises the same decode/augment path as real photos.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("checkers", "spots", "stripes")


def _render(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(3, 7)
        mask = np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle))) > 0
    elif kind == "checkers":
        angle = rng.uniform(0, np.pi / 2)
        freq = rng.uniform(2.5, 5)
        u = x * np.cos(angle) + y * np.sin(angle)
        v = -x * np.sin(angle) + y * np.cos(angle)
        mask = (np.sin(2 * np.pi * freq * u) > 0) ^ (np.sin(2 * np.pi * freq * v) > 0)
    else:
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(rng.integers(6, 14)):
            cx, cy = rng.uniform(0, 1, size=2)
            r = rng.uniform(0.04, 0.09)
            mask |= np.hypot(x - cx, y - cy) < r
    fg = rng.uniform(0, 255, size=3)
    bg = rng.uniform(0, 255, size=3)
    if abs(fg.mean() - bg.mean()) < 70:  # keep the pattern visible: shift the background away
        bg = (bg + (-110 if fg.mean() > 127 else 110)).clip(0, 255)
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, size=(size, size, 3))
    return img.clip(0, 255).astype(np.uint8)


def make_synthetic(
    root: str | Path, classes: int = 3, per_class: int = 100, size: int = 64, seed: int = 0
) -> Path:
    """Write ``root/<class>/<class>_<i>.jpg``; the folder appears complete or not at all."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for kind in CLASSES[:classes]:
            (tmp / kind).mkdir()
            for i in range(per_class):
                Image.fromarray(_render(kind, size, rng)).save(tmp / kind / f"{kind}_{i:04d}.jpg", quality=90)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
