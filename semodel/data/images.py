"""Reading images: open with a pixel limit, decode any mode as 8-bit RGB, and the reasons a file
cannot be used."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from semodel.errors import SemodelError, first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# What reading a file that is gone or damaged since the scan raises: the loaders skip such an image.
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

_OPEN_LOCK = threading.Lock()


def open_image(path: str | Path) -> Image.Image:
    """``Image.open``, with more pixels than ``Image.MAX_IMAGE_PIXELS`` an error.

    PIL raises ``DecompressionBombError`` only above twice its limit; between the two it warns
    (two lines on stderr) and then decodes the whole image (up to 180 M pixels: 0.5 GB as RGB).
    The warning filter is process-wide, hence the lock (images are opened in threads).
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombWarning as e:
            raise Image.DecompressionBombError(str(e)) from None


def load_rgb(path: str | Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open any image as 8-bit RGB: grayscale, RGBA, palette, CMYK and 16-bit files included.

    ``draft``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), the largest
    reduction that keeps both sides at least this large: a 12-megapixel photo wanted at a few
    hundred pixels decodes several times faster. Other formats ignore it.
    """
    with open_image(path) as img:
        if draft is not None:
            img.draft(None, draft)
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16/32-bit grayscale: scale to 8 bits instead of clipping at 255.
            import numpy as np

            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            img = Image.fromarray((arr / top * 255).clip(0, 255).astype("uint8"), mode="L")
        elif img.mode == "F":
            import numpy as np

            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray((arr.clip(0, 1) * 255).astype("uint8"), mode="L")
        if img.mode in ("P", "LA", "PA") or (img.mode == "RGBA"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def read_image(path: Path) -> Image.Image:
    """``load_rgb`` with the reason a file cannot be used as one short SemodelError."""
    try:
        return load_rgb(path)
    except FileNotFoundError:
        reason = "file not found"
    except IsADirectoryError:
        reason = "is a folder"
    except PermissionError:
        reason = "permission denied"
    except UnidentifiedImageError:
        reason = "not an image (unknown file format)"
    except Image.DecompressionBombError:
        reason = "too many pixels (decompression bomb guard)"
    except (OSError, SyntaxError, ValueError) as e:
        reason = f"corrupt image ({first_line(e, 100)})"
    raise SemodelError(reason)


def probe_failure(error: BaseException) -> str:
    """Why a file is not a usable image, from what reading it raised."""
    if isinstance(error, Image.DecompressionBombError):
        return "too many pixels (decompression bomb guard)"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"cannot decode ({first_line(error, 80)})"


def probe_image(path: Path) -> tuple[str | None, tuple[int, int]]:
    """(None if the file decodes as an image, else the reason it does not; its (height, width))."""
    try:
        with open_image(path) as img:
            size = (img.height, img.width)
            img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            img.load()
        return None, size
    except UNREADABLE as e:
        return probe_failure(e), (0, 0)


def check_image(path: Path) -> str | None:
    """None if the file decodes as an image, else the reason it does not."""
    return probe_image(path)[0]


def usable_cpus() -> int:
    """The cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def warn_skipped(path: Path, error: BaseException) -> None:
    print(f"warning: skipping {path}: {first_line(error, 100)}", file=sys.stderr)
