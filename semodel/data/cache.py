"""``data.cache``: decode every image once, keep it as uint8 in RAM or on the GPU, and make each
training batch from the kept pixels instead of decoding the files every epoch.

- **Training images are kept large enough for every crop.** A photo of H x W pixels is kept at
  its own aspect ratio, scaled so that the smallest crop ``augment.scale`` allows (area
  ``scale[0]``, aspect ratio 3/4 or 4/3 in pixels) still holds ``image_size`` pixels on its
  shorter side (``stored_size``), never larger than the photo itself. Every crop is then
  downsampled to ``image_size``, as in the uncached path, which crops the full photo.
- **One geometry for both paths.** Each batch draws, per image, the crop box in the photo's own
  pixels exactly as the uncached path's ``RandomResizedCrop`` draws it (the same random numbers
  from the same stream: ``crop_params``), then the flips of ``augment.hflip`` / ``augment.vflip``.
  The box is carried over to the kept pixels (``crop_kept``) and resized to ``image_size``
  with antialiasing. Where a photo is kept at its full size the batch equals the uncached path's
  bit for bit; else the two differ by the resampling only (tests/test_cache.py bounds it).
- **Validation images** are kept exactly as the eval transform makes them (resize, centre crop,
  uint8); only the normalisation happens per batch, so validation metrics equal the uncached ones.
- Per-image augmentations (``auto_augment``, ``color_jitter``, ``random_erasing``) are not done
  in the cached path: ``data.cache: ram|gpu`` refuses them, ``auto`` then falls back to ``none``.

Memory: 3 bytes per kept pixel. A 64-px run with ``scale: [0.35, 1.0]`` keeps a square photo at
125 x 125 px (46 KiB); MSLD's 3192 photos of 224 px take 0.15 GiB at 64 px and 0.45 GiB at 128 px
(kept whole: 224 px is less than the 250 px a 128-px run would want). ``auto`` takes the cache
only where it fits in a quarter of what is free, else decodes per epoch (``none``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semodel.data.images import UNREADABLE, load_rgb, open_image, usable_cpus, warn_skipped
from semodel.data.loading import collate_skip_bad
from semodel.data.scan import Sample
from semodel.errors import SemodelError

FREE_SHARE = 0.25  # auto: the cache may take this share of free GPU memory / available RAM
EXPLICIT_SHARE = 0.9  # ram / gpu given explicitly: refused above this share (the machine would swap or fail)
RATIO = (3 / 4, 4 / 3)  # the aspect ratios of the random resized crop (torchvision's default, both paths)


def unsupported(cfg: Any) -> list[str]:
    """The configured augmentations that the cached path does not do."""
    a = cfg.data.augment
    found = []
    if a.auto_augment != "none":
        found.append(f"augment.auto_augment: {a.auto_augment}")
    if a.color_jitter > 0:
        found.append(f"augment.color_jitter: {a.color_jitter:g}")
    if a.random_erasing > 0:
        found.append(f"augment.random_erasing: {a.random_erasing:g}")
    return found


# ----------------------------------------------------------------------------- sizes and memory


def stored_size(height: int, width: int, image_size: int, min_scale: float) -> tuple[int, int]:
    """The size (height, width) a training photo is kept at: its own aspect ratio, scaled so that
    the smallest crop the augmentation draws (area ``min_scale``, aspect ratio 3/4 or 4/3 in
    pixels, so a shorter side of sqrt(area x 3/4)) still has ``image_size`` pixels; never larger
    than the photo."""
    if height <= 0 or width <= 0:
        return 0, 0
    wanted_area = image_size**2 / (min_scale * RATIO[0])
    factor = min(1.0, math.sqrt(wanted_area / (height * width)))
    return min(height, max(1, math.ceil(height * factor))), min(width, max(1, math.ceil(width * factor)))


def photo_sizes(
    root: Path, samples: Sequence[Sample], known: dict[str, tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """Each image's (height, width): from ``known`` (the scan's) where it has them all, else from the
    headers (no decoding); (0, 0) for a file that cannot be opened (the decoding skips it later,
    with its warning)."""
    if known and all(s.path in known for s in samples):
        return [known[s.path] for s in samples]

    def one(sample: Sample) -> tuple[int, int]:
        try:
            with open_image(Path(root) / sample.path) as img:
                return img.height, img.width
        except UNREADABLE:
            return 0, 0

    with ThreadPoolExecutor(min(8, usable_cpus())) as pool:
        return list(pool.map(one, samples))


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def describe_kept(kept: Sequence[tuple[int, int]]) -> str:
    """``stored at 125 x 125 px``, or the range of the shorter sides where the sizes differ."""
    sizes = sorted({s for s in kept if s[0] > 0})
    if not sizes:
        return "stored at 0 px"
    if len(sizes) == 1:
        return f"stored at {sizes[0][1]} x {sizes[0][0]} px"
    shorter = [min(s) for s in sizes]
    return f"stored at {min(shorter)}-{max(shorter)} px on the shorter side"


@dataclass
class Plan:
    """The cache a run uses (``gpu``, ``ram`` or ``none``), why (the log line), and for a cache the
    training photos' sizes (height, width) and the sizes they are kept at."""

    kind: str
    why: str
    photos: list[tuple[int, int]] = field(default_factory=list)
    kept: list[tuple[int, int]] = field(default_factory=list)


def refuse(cfg: Any, device: torch.device, setting: str | None = None) -> None:
    """A SemodelError for a ``data.cache: ram|gpu`` that these augmentations or this device cannot take."""
    setting = setting or cfg.data.cache
    blockers = unsupported(cfg)
    if setting in ("ram", "gpu") and blockers:
        raise SemodelError(
            f"data.cache: {setting} augments whole batches and does not do {', '.join(blockers)}; "
            "remove them or set data.cache: none"
        )
    if setting == "gpu" and device.type != "cuda":
        raise SemodelError(f"data.cache: gpu needs a CUDA device (training runs on {device}); use ram")


def choose(
    cfg: Any,
    device: torch.device,
    photos_of_train: Callable[[], list[tuple[int, int]]],
    n_val: int,
    setting: str | None = None,
) -> Plan:
    """The cache to use and why (``setting``: instead of ``data.cache``; ``photos_of_train``: the
    training images' (height, width), asked for only where a cache is possible). ``auto`` takes the
    GPU, else RAM, where the cache fits in a quarter of what is free, else decodes per epoch;
    ``ram`` / ``gpu`` say what they cost, and are refused where they would not fit at all."""
    setting = setting or cfg.data.cache
    if setting == "none":
        return Plan("none", "data.cache: none")
    refuse(cfg, device, setting)
    blockers = unsupported(cfg)
    if blockers:  # auto
        return Plan("none", f"data.cache auto: off, per-image augmentations ({', '.join(blockers)})")
    photos = photos_of_train()
    kept = [stored_size(h, w, cfg.data.image_size, cfg.data.augment.scale[0]) for h, w in photos]
    need = 3 * (sum(h * w for h, w in kept) + n_val * cfg.data.image_size**2)
    cost = f"{describe_kept(kept)}, {need / 2**30:.2f} GiB"
    if setting in ("gpu", "ram"):
        room = torch.cuda.mem_get_info(device)[0] if setting == "gpu" else available_ram()
        where = "free GPU memory" if setting == "gpu" else "available RAM"
        if need > EXPLICIT_SHARE * room:
            raise SemodelError(
                f"data.cache: {setting} needs {need / 2**30:.2f} GiB (training images "
                f"{describe_kept(kept)}), more than the {room / 2**30:.1f} GiB of {where}; "
                "set data.cache: auto or none"
            )
        return Plan(
            setting, f"data.cache: {setting} ({cost} of {room / 2**30:.0f} GiB {where})", photos, kept
        )
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need <= FREE_SHARE * free:
            return Plan("gpu", f"data.cache auto: gpu ({cost} of {free / 2**30:.0f} GiB free)", photos, kept)
    ram = available_ram()
    if need <= FREE_SHARE * ram:
        return Plan("ram", f"data.cache auto: ram ({cost} of {ram / 2**30:.0f} GiB available)", photos, kept)
    return Plan(
        "none",
        f"data.cache auto: off ({cost} would take more than a quarter of the {ram / 2**30:.0f} GiB "
        "available; decoding every epoch instead)",
    )


# ----------------------------------------------------------------------------- decoding


def decode(path: Path, resize: int, crop: int) -> torch.Tensor:
    """uint8 3 x crop x crop as the eval transform makes it: shorter side resized to ``resize``
    (antialiased), centre crop."""
    from torchvision.transforms.v2 import functional as TF

    image = TF.pil_to_tensor(load_rgb(path))
    image = TF.resize(image, [resize], antialias=True)
    return TF.center_crop(image, [crop, crop]).contiguous()


def decode_kept(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """uint8 3 x height x width: the whole photo resized (antialiased) to ``size``. A large JPEG is
    decoded at a reduced scale that keeps both sides at least that large (``load_rgb``'s draft),
    never below it: the crops are cut from ``size`` pixels either way."""
    from torchvision.transforms.v2 import functional as TF

    height, width = size
    if height <= 0 or width <= 0:  # its header could not be read when the sizes were taken
        raise OSError("cannot be opened")
    image = TF.pil_to_tensor(load_rgb(path, draft=(width, height)))
    if tuple(image.shape[-2:]) != (height, width):
        image = TF.resize(image, [height, width], antialias=True)
    return image.contiguous()


@dataclass
class Decoded:
    """One split decoded: the images (a list of uint8 3 x H x W tensors for training, where sizes
    differ; one uint8 N x 3 x S x S tensor for validation), the labels, each training photo's own
    (height, width) (its crops are drawn in those pixels), and whether each image could be read."""

    images: list[torch.Tensor] | torch.Tensor
    labels: torch.Tensor
    photos: list[tuple[int, int]]
    readable: torch.Tensor


def decode_all(
    root: Path,
    samples: Sequence[Sample],
    decoder: Callable[[Path, int], torch.Tensor],
    device: torch.device,
    stack: int | None = None,
) -> Decoded:
    """Every sample decoded by ``decoder(path, index)`` onto ``device``: a list, or with ``stack``
    one N x 3 x stack x stack tensor. An unreadable image (gone or damaged since the scan) is
    skipped with a warning, as the uncached loaders skip it."""
    n = len(samples)
    empty = torch.zeros((3, 1, 1), dtype=torch.uint8, device=device)
    images: Any = [empty] * n
    if stack is not None:
        images = torch.zeros((n, 3, stack, stack), dtype=torch.uint8, device=device)
    readable = torch.ones(n, dtype=torch.bool)

    def one(i: int) -> None:
        path = Path(root) / samples[i].path
        try:
            images[i] = decoder(path, i).to(device)
        except UNREADABLE as e:
            warn_skipped(path, e)
            readable[i] = False

    with ThreadPoolExecutor(min(8, usable_cpus())) as pool:  # PIL decodes without the GIL
        list(pool.map(one, range(n)))
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return Decoded(images, labels, [], readable)


# ----------------------------------------------------------------------------- augmentation


def crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float] = RATIO
) -> tuple[int, int, int, int]:
    """A random resized crop's box (top, left, height, width) in a photo of ``height`` x ``width``
    pixels, drawn as torchvision's ``RandomResizedCrop`` draws it, from the same global random
    stream: up to 10 draws of an area (uniform in ``scale``) and an aspect ratio (log-uniform in
    ``ratio``) until the crop fits, its position then uniform; else the whole photo cut to the
    nearest allowed aspect ratio, centred. Same seed, same boxes as the uncached path."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]))).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    photo_ratio = width / height
    w, h = width, height
    if photo_ratio < min(ratio):
        h = int(round(w / min(ratio)))
    elif photo_ratio > max(ratio):
        w = int(round(h * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


def crop_kept(
    image: torch.Tensor, photo: tuple[int, int], box: tuple[int, int, int, int], size: int
) -> torch.Tensor:
    """The crop ``box`` (in the photo's pixels) of a kept image (the photo resized), resized with
    antialiasing to ``size`` x ``size``; uint8. The box's edges are carried over to the kept pixels
    and rounded to the nearest one (at most half a kept pixel off, which is at most half an output
    pixel, since every crop keeps at least ``size`` pixels a side)."""
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = box
    sy, sx = image.shape[-2] / photo[0], image.shape[-1] / photo[1]
    y0, x0 = round(top * sy), round(left * sx)
    y1, x1 = max(y0 + 1, round((top + h) * sy)), max(x0 + 1, round((left + w) * sx))
    return TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [size, size], antialias=True)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 -> float, as the transforms' ``ToDtype(scale=True)`` and ``Normalize`` do it (bit for bit)."""
    x = x.float().mul_(1.0 / 255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


@dataclass
class Augment:
    """The training augmentation of a config, on kept images: random resized crop, then flips."""

    size: int
    scale: tuple[float, float]
    hflip: float
    vflip: float

    @classmethod
    def of(cls, cfg: Any) -> Augment:
        a = cfg.data.augment
        return cls(cfg.data.image_size, tuple(a.scale), a.hflip, a.vflip)

    def one(self, image: torch.Tensor, photo: tuple[int, int]) -> torch.Tensor:
        # The draws in the uncached path's order (crop, hflip, vflip), each only where it is configured.
        out = crop_kept(image, photo, crop_params(photo[0], photo[1], self.scale), self.size)
        if self.hflip > 0 and torch.rand(1) < self.hflip:
            out = out.flip(-1)
        if self.vflip > 0 and torch.rand(1) < self.vflip:
            out = out.flip(-2)
        return out

    def __call__(self, images: Sequence[torch.Tensor], photos: Sequence[tuple[int, int]]) -> torch.Tensor:
        """uint8 N x 3 x size x size."""
        return torch.stack([self.one(image, photo) for image, photo in zip(images, photos, strict=True)])


class CachedBatches:
    """Batches ``(images, labels)`` from a decoded split, ready on ``device``.

    ``batches``: the index lists (a batch sampler, or fixed chunks for evaluation); images that
    could not be read are left out of them. ``transform``: the training augmentation, or None for
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
        self.readable = decoded.readable.tolist()

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self):
        d = self.decoded
        for batch in self.batches:
            index = [i for i in batch if self.readable[i]]
            if not index:
                yield collate_skip_bad([])  # the empty batch the uncached loaders yield
                continue
            if self.transform is not None:
                images = self.transform([d.images[i] for i in index], [d.photos[i] for i in index])
            else:
                images = d.images[torch.as_tensor(index, device=d.images.device)]
            images = normalize(images.to(self.device, non_blocking=True), self.mean, self.std)
            yield images, d.labels[index]


def cached_loaders(
    cfg: Any,
    plan: Plan,
    root: Path,
    train: Sequence[Sample],
    val: Sequence[Sample],
    sampler,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[CachedBatches, CachedBatches]:
    """Decode the training and validation images once; the two loaders the training loop uses."""
    store = device if plan.kind == "gpu" else torch.device("cpu")
    resize, size = int(round(cfg.data.image_size / cfg.data.crop_ratio)), cfg.data.image_size
    where = "GPU memory" if plan.kind == "gpu" else "RAM"
    log(f"data.cache: decoding {len(train)} + {len(val)} images into {where} ...")
    t0 = time.time()
    train_set = decode_all(root, train, lambda path, i: decode_kept(path, plan.kept[i]), store)
    train_set.photos = list(plan.photos)
    val_set = decode_all(root, val, lambda path, i: decode(path, resize, size), store, stack=size)
    nbytes = sum(t.numel() for t in train_set.images) + val_set.images.numel()
    log(
        f"data.cache: decoded {len(train)} + {len(val)} images once into {where} "
        f"({nbytes / 2**30:.2f} GiB uint8; training images {describe_kept(plan.kept)}) in "
        f"{time.time() - t0:.1f}s; crops are cut per image on {store.type}"
    )
    chunk = cfg.data.batch_size * 2
    val_batches = [list(range(i, min(i + chunk, len(val)))) for i in range(0, len(val), chunk)]
    mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    return (
        CachedBatches(train_set, sampler, device, Augment.of(cfg), mean, std),
        CachedBatches(val_set, val_batches, device, None, mean, std),
    )
