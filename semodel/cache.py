"""``data.cache``: decode every image once, keep it as uint8 in RAM or on the GPU, and augment whole
batches on the training device instead of one image at a time in data loader workers.

- Training images are kept whole, resized (antialiased) to an ``R x R`` square, R = the eval
  resize (``image_size / crop_ratio``), with each image's aspect ratio (width / height) beside
  it. Each batch gets a random resized crop drawn in the image's own pixel proportions (area
  fraction in ``augment.scale``, aspect ratio 3/4..4/3, as the uncached path draws it), the flips
  of ``augment.hflip`` / ``augment.vflip``, all in one ``affine_grid`` + ``grid_sample`` per
  batch, then the normalisation. Squashing to a square changes where a pixel is stored, not what
  a crop shows: a crop's fractions of the width and height are the same in the squashed image,
  so the borders of non-square photos are seen as in the uncached path; the longer side is
  stored at R pixels rather than at its full length.
- Validation images are kept exactly as the eval transform makes them (resize, centre crop,
  uint8); only the normalisation happens per batch, so validation metrics equal the uncached ones.
- Per-image augmentations (``auto_augment``, ``color_jitter``, ``random_erasing``) are not done
  in the cached path: ``data.cache: ram|gpu`` refuses them, ``auto`` then falls back to ``none``.

Memory: 3 x R x R bytes per training image (256 px: 192 KiB; MSLD's 3192 copies: 0.6 GiB).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from semodel.data import UNREADABLE, Sample, collate_skip_bad, load_rgb, warn_skipped
from semodel.errors import SemodelError

FREE_SHARE = 0.25  # auto: the cache may take this share of free GPU memory / available RAM


def unsupported(cfg: Any) -> list[str]:
    """The configured augmentations that the batched path does not do."""
    a = cfg.data.augment
    found = []
    if a.auto_augment != "none":
        found.append(f"augment.auto_augment: {a.auto_augment}")
    if a.color_jitter > 0:
        found.append(f"augment.color_jitter: {a.color_jitter:g}")
    if a.random_erasing > 0:
        found.append(f"augment.random_erasing: {a.random_erasing:g}")
    return found


def cache_bytes(cfg: Any, n_train: int, n_val: int) -> int:
    resize = int(round(cfg.data.image_size / cfg.data.crop_ratio))
    return 3 * (n_train * resize * resize + n_val * cfg.data.image_size**2)


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def refuse(cfg: Any, device: torch.device) -> None:
    """A SemodelError for a ``data.cache: ram|gpu`` that these augmentations or this device cannot take."""
    setting = cfg.data.cache
    blockers = unsupported(cfg)
    if setting in ("ram", "gpu") and blockers:
        raise SemodelError(
            f"data.cache: {setting} augments whole batches and does not do {', '.join(blockers)}; "
            "remove them or set data.cache: none"
        )
    if setting == "gpu" and device.type != "cuda":
        raise SemodelError(f"data.cache: gpu needs a CUDA device (training runs on {device}); use ram")


def choose(cfg: Any, device: torch.device, n_train: int, n_val: int) -> tuple[str, str]:
    """The cache to use (``gpu``, ``ram`` or ``none``) and why, for the log line."""
    setting = cfg.data.cache
    if setting == "none":
        return "none", "data.cache: none"
    refuse(cfg, device)
    blockers = unsupported(cfg)
    if blockers:  # auto
        return "none", f"data.cache auto: off, per-image augmentations ({', '.join(blockers)})"
    need = cache_bytes(cfg, n_train, n_val)
    if setting == "gpu":
        return "gpu", f"data.cache: gpu ({need / 2**30:.2f} GiB)"
    if setting == "ram":
        return "ram", f"data.cache: ram ({need / 2**30:.2f} GiB)"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need <= FREE_SHARE * free:
            return "gpu", f"data.cache auto: gpu ({need / 2**30:.2f} GiB of {free / 2**30:.0f} GiB free)"
    ram = available_ram()
    if need <= FREE_SHARE * ram:
        return "ram", f"data.cache auto: ram ({need / 2**30:.2f} GiB of {ram / 2**30:.0f} GiB available)"
    return "none", f"data.cache auto: off ({need / 2**30:.2f} GiB does not fit)"


# ----------------------------------------------------------------------------- decoding


def decode(path: Path, resize: int, crop: int) -> tuple[torch.Tensor, float]:
    """uint8 3 x crop x crop as the eval transform makes it: shorter side resized to ``resize``
    (antialiased), centre crop. The aspect ratio of the result (1) comes with it."""
    from torchvision.transforms.v2 import functional as TF

    image = TF.pil_to_tensor(load_rgb(path))
    image = TF.resize(image, [resize], antialias=True)
    return TF.center_crop(image, [crop, crop]).contiguous(), 1.0


def decode_whole(path: Path, side: int) -> tuple[torch.Tensor, float]:
    """uint8 3 x side x side: the whole image resized (antialiased) to a square, and its aspect
    ratio (width / height), which the crops are drawn in. A large JPEG is decoded at a reduced
    scale that keeps both sides at least ``side`` (``load_rgb``'s draft): the training crops are
    sampled from ``side`` pixels either way."""
    from torchvision.transforms.v2 import functional as TF

    image = TF.pil_to_tensor(load_rgb(path, draft=(side, side)))
    height, width = image.shape[-2:]
    return TF.resize(image, [side, side], antialias=True).contiguous(), width / height


@dataclass
class Decoded:
    """One split decoded: uint8 N x 3 x S x S images and their labels, each image's aspect ratio
    (width / height: the crops are drawn in it) and whether it could be read."""

    images: torch.Tensor
    labels: torch.Tensor
    aspects: torch.Tensor
    readable: torch.Tensor


def decode_all(
    root: Path,
    samples: Sequence[Sample],
    side: int,
    decoder: Callable[[Path], tuple[torch.Tensor, float]],
    device: torch.device,
    threads: int | None = None,
) -> Decoded:
    """Every sample decoded by ``decoder`` into one tensor on ``device``. An unreadable image (gone
    or damaged since the scan) is skipped with a warning, as the uncached loaders skip it."""
    out = torch.zeros((len(samples), 3, side, side), dtype=torch.uint8, device=device)
    aspects = torch.ones(len(samples))
    readable = torch.ones(len(samples), dtype=torch.bool)
    threads = threads or min(8, os.cpu_count() or 1)

    def one(i: int) -> None:
        path = Path(root) / samples[i].path
        try:
            image, aspects[i] = decoder(path)
        except UNREADABLE as e:
            warn_skipped(path, e)
            readable[i] = False
            return
        out[i] = image.to(device)

    with ThreadPoolExecutor(threads) as pool:  # PIL decodes and resizes without holding the GIL
        list(pool.map(one, range(len(samples))))
    return Decoded(out, torch.tensor([s.label for s in samples], dtype=torch.long), aspects, readable)


# ----------------------------------------------------------------------------- batched augmentation


def crop_boxes(
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    aspects: torch.Tensor | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """n random crops as (width, height, centre x, centre y) in fractions of each image's width and
    height; ``aspects``: the images' width / height (default 1, squares).

    Drawn as the uncached path's random resized crop draws them: up to ``tries`` draws of an area
    fraction (uniform in ``scale``) and an aspect ratio in pixels (log-uniform in ``ratio``) until
    the crop fits in the image, the centre then uniform over the positions where it fits; when no
    draw fits, the whole image cut to the nearest aspect ratio in ``ratio``, centred.
    """
    u = torch.rand(n, tries + 1, 2, generator=generator)  # the last pair places the crop
    image_aspect = (torch.ones(n) if aspects is None else aspects.float())[:, None]
    area = scale[0] + (scale[1] - scale[0]) * u[:, :tries, 0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, :tries, 1])
    w = torch.sqrt(area * aspect / image_aspect)
    h = torch.sqrt(area * image_aspect / aspect)
    fits = (w <= 1) & (h <= 1)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first draw that fits (0 when none does)
    found = fits.any(dim=1)
    whole_w = (ratio[1] / image_aspect[:, 0]).clamp(max=1.0)
    whole_h = (image_aspect[:, 0] / ratio[0]).clamp(max=1.0)
    w = torch.where(found, w.gather(1, first)[:, 0], whole_w)
    h = torch.where(found, h.gather(1, first)[:, 0], whole_h)
    cx = w / 2 + (1 - w) * torch.where(found, u[:, tries, 0], 0.5)
    cy = h / 2 + (1 - h) * torch.where(found, u[:, tries, 1], 0.5)
    return torch.stack([w, h, cx, cy], dim=1)


def resized_crops(
    images: torch.Tensor,
    boxes: torch.Tensor,
    size: int,
    hflip: torch.Tensor | None = None,
    vflip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop ``boxes`` (see ``crop_boxes``) out of ``images`` (N x 3 x H x W, uint8 or float) and
    resize them to ``size`` (bilinear), flipped where ``hflip`` / ``vflip`` are true; float in [0, 1]."""
    n = images.shape[0]
    boxes = boxes.to(images.device, torch.float32)
    sx = boxes[:, 0] * (1 - 2 * hflip.to(images.device).float()) if hflip is not None else boxes[:, 0]
    sy = boxes[:, 1] * (1 - 2 * vflip.to(images.device).float()) if vflip is not None else boxes[:, 1]
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * boxes[:, 2] - 1
    theta[:, 1, 1], theta[:, 1, 2] = sy, 2 * boxes[:, 3] - 1
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    x = images.float() if images.dtype != torch.uint8 else images.float().mul_(1.0 / 255)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


@dataclass
class Augment:
    """The batched training augmentation of a config."""

    size: int
    scale: tuple[float, float]
    hflip: float
    vflip: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, cfg: Any) -> Augment:
        a = cfg.data.augment
        return cls(
            cfg.data.image_size, tuple(a.scale), a.hflip, a.vflip, tuple(cfg.data.mean), tuple(cfg.data.std)
        )

    def __call__(self, images: torch.Tensor, aspects: torch.Tensor | None = None) -> torch.Tensor:
        n = images.shape[0]
        boxes = crop_boxes(n, self.scale, aspects=aspects)  # on the CPU: the same stream on every device
        hflip = torch.rand(n) < self.hflip
        vflip = torch.rand(n) < self.vflip
        return normalize(resized_crops(images, boxes, self.size, hflip, vflip), self.mean, self.std)


class CachedBatches:
    """Batches ``(images, labels)`` from a decoded split, ready on ``device``.

    ``batches``: the index lists (a batch sampler, or fixed chunks for evaluation); images that
    could not be read are left out of them. ``transform``: the batched augmentation, or None for
    evaluation (normalisation only).
    """

    def __init__(
        self,
        decoded: Decoded,
        batches: Iterable[list[int]],
        device: torch.device,
        transform: Augment | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.decoded, self.batches = decoded, batches
        self.device, self.transform, self.mean, self.std = device, transform, mean, std
        self.skip = not decoded.readable.all()

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self):
        d = self.decoded
        for batch in self.batches:
            index = torch.as_tensor(batch, dtype=torch.long)
            if self.skip:
                index = index[d.readable[index]]
                if len(index) == 0:
                    yield collate_skip_bad([])  # the empty batch the uncached loaders yield
                    continue
            images = d.images[index.to(d.images.device)].to(self.device, non_blocking=True)
            if self.transform is not None:
                images = self.transform(images, d.aspects[index])
            else:
                # as the eval transform's ToDtype(scale=True) and Normalize: bit for bit the same values
                images = normalize(images.float().mul_(1.0 / 255), self.mean, self.std)
            yield images, d.labels[index]


def cached_loaders(
    cfg: Any,
    kind: str,
    root: Path,
    train: Sequence[Sample],
    val: Sequence[Sample],
    sampler,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[CachedBatches, CachedBatches]:
    """Decode the training and validation images once; the two loaders the training loop uses."""
    import time

    store = device if kind == "gpu" else torch.device("cpu")
    resize = int(round(cfg.data.image_size / cfg.data.crop_ratio))
    where = "GPU memory" if kind == "gpu" else "RAM"
    log(f"data.cache: decoding {len(train)} + {len(val)} images into {where} ...")
    t0 = time.time()
    train_set = decode_all(root, train, resize, lambda path: decode_whole(path, resize), store)
    size = cfg.data.image_size
    val_set = decode_all(root, val, size, lambda path: decode(path, resize, size), store)
    gib = (train_set.images.numel() + val_set.images.numel()) / 2**30
    log(
        f"data.cache: decoded {len(train)} + {len(val)} images once into {where} "
        f"({gib:.2f} GiB uint8) in {time.time() - t0:.1f}s; augmentation runs per batch on {device}"
    )
    chunk = cfg.data.batch_size * 2
    val_batches = [list(range(i, min(i + chunk, len(val)))) for i in range(0, len(val), chunk)]
    mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    return (
        CachedBatches(train_set, sampler, device, Augment.of(cfg), mean, std),
        CachedBatches(val_set, val_batches, device, None, mean, std),
    )
