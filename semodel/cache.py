"""``data.cache``: decode every image once, keep it as uint8 in RAM or on the GPU, and augment whole
batches on the training device instead of one image at a time in data loader workers.

- Training images are kept as ``R x R`` squares, R = the eval resize (``image_size / crop_ratio``):
  shorter side resized to R (antialiased, as the eval transform does), centre crop. Each batch
  gets a random resized crop (area fraction in ``augment.scale``, aspect ratio 3/4..4/3), the
  flips of ``augment.hflip`` / ``augment.vflip``, all in one ``affine_grid`` + ``grid_sample``
  per batch, then the normalisation. The crop is taken from the centred square, so the borders of
  non-square images are not seen (for square photos, such as MSLD's, nothing is lost).
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

from semodel.data import Sample, load_rgb
from semodel.errors import SemodelError, first_line

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


def decode(path: Path, resize: int, crop: int) -> torch.Tensor:
    """uint8 3 x crop x crop: shorter side resized to ``resize`` (antialiased), centre crop."""
    from torchvision.transforms.v2 import functional as TF

    image = TF.pil_to_tensor(load_rgb(path))
    image = TF.resize(image, [resize], antialias=True)
    return TF.center_crop(image, [crop, crop]).contiguous()


def decode_all(
    root: Path,
    samples: Sequence[Sample],
    resize: int,
    crop: int,
    device: torch.device,
    threads: int | None = None,
) -> torch.Tensor:
    """Every sample decoded into one N x 3 x crop x crop uint8 tensor on ``device``."""
    out = torch.empty((len(samples), 3, crop, crop), dtype=torch.uint8, device=device)
    threads = threads or min(8, os.cpu_count() or 1)

    def one(i: int) -> None:
        try:
            out[i] = decode(Path(root) / samples[i].path, resize, crop).to(device)
        except (OSError, SyntaxError, ValueError) as e:
            reason = first_line(e, 100)
            raise SemodelError(
                f"data.cache: cannot decode {Path(root) / samples[i].path} ({reason}); "
                "it was readable when the data were checked: was it changed?"
            ) from None

    with ThreadPoolExecutor(threads) as pool:  # PIL decodes and resizes without holding the GIL
        list(pool.map(one, range(len(samples))))
    return out


# ----------------------------------------------------------------------------- batched augmentation


def crop_boxes(
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n random crops as (width, height, centre x, centre y) in fractions of the square's side.

    Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio`` (as a random
    resized crop draws them); a side longer than the image is cut to the image, and the centre is
    uniform over the positions where the crop fits.
    """
    u = torch.rand(n, 4, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = w / 2 + (1 - w) * u[:, 2]
    cy = h / 2 + (1 - h) * u[:, 3]
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
    x = images.float() if images.dtype != torch.uint8 else images.float().div_(255)
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

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        boxes = crop_boxes(n, self.scale)  # drawn on the CPU: the same stream on every device
        hflip = torch.rand(n) < self.hflip
        vflip = torch.rand(n) < self.vflip
        return normalize(resized_crops(images, boxes, self.size, hflip, vflip), self.mean, self.std)


class CachedBatches:
    """Batches ``(images, labels)`` from cached uint8 images, ready on ``device``.

    ``batches``: the index lists (a batch sampler, or fixed chunks for evaluation);
    ``transform``: the batched augmentation, or None for evaluation (normalisation only).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batches: Iterable[list[int]],
        device: torch.device,
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.images, self.labels, self.batches = images, labels, batches
        self.device, self.transform, self.mean, self.std = device, transform, mean, std

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self):
        for batch in self.batches:
            index = torch.as_tensor(batch, dtype=torch.long)
            images = self.images[index.to(self.images.device)].to(self.device, non_blocking=True)
            if self.transform is not None:
                images = self.transform(images)
            else:
                images = normalize(images.float().div_(255), self.mean, self.std)
            yield images, self.labels[index]


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
    t0 = time.time()
    train_images = decode_all(root, train, resize, resize, store)
    val_images = decode_all(root, val, resize, cfg.data.image_size, store)
    size = (train_images.numel() + val_images.numel()) / 2**30
    where = "GPU memory" if kind == "gpu" else "RAM"
    log(
        f"data.cache: decoded {len(train)} + {len(val)} images once into {where} "
        f"({size:.2f} GiB uint8) in {time.time() - t0:.1f}s; augmentation runs per batch on {device}"
    )
    train_labels = torch.tensor([s.label for s in train])
    val_labels = torch.tensor([s.label for s in val])
    chunk = cfg.data.batch_size * 2
    val_batches = [list(range(i, min(i + chunk, len(val)))) for i in range(0, len(val), chunk)]
    mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    return (
        CachedBatches(train_images, train_labels, sampler, device, Augment.of(cfg), mean, std),
        CachedBatches(val_images, val_labels, val_batches, device, None, mean, std),
    )
