"""The evaluation transform's geometry and ``preprocess_image``, without torchvision.

Cold start matters for ``semodel predict`` (one image, on a CPU) and importing torchvision pulls in
``torch._dynamo`` (about 2 s), so inference prepares images with plain torch calls that reproduce
``semodel.data.eval_transform`` (torchvision v2) step by step; a test checks both give the same tensor.
A checkpoint's ``preprocess`` dict (``preprocess_of``) holds everything this needs.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from semodel.errors import SemodelError


def preprocess_of(cfg: Any) -> dict[str, Any]:
    """What inference needs to prepare an image like evaluation did; stored in checkpoints."""
    size = cfg.data.image_size
    return {
        "image_size": size,
        "resize": int(round(size / cfg.data.crop_ratio)),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "interpolation": "bilinear",
    }


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's ``Resize(int)``: the shorter side becomes ``short``, the longer one is truncated."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner of torchvision's ``CenterCrop(size)`` (the image is at least ``size``)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _uint8_resize_is_native() -> bool:
    """Whether the installed torchvision resizes uint8 images directly instead of through floats.

    Its rule (``_do_native_uint8_resize_on_cpu``) changed over releases: AVX2 CPUs up to 0.23,
    AVX2 and AVX512 from 0.24, and ARM too from 0.27. The version is read from the package's
    metadata, so that predict still does not import torchvision.
    """
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = tuple(int(part) for part in version("torchvision").split("+")[0].split(".")[:2])
    except (PackageNotFoundError, ValueError):
        release = (0, 29)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX2" or (capability == "AVX512" and release >= (0, 24)):
        return True
    return release >= (0, 27) and platform.machine() in ("aarch64", "arm64")


def _resize_uint8(x: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """Antialiased bilinear resize of a uint8 ``3 x H x W`` image, rounded as torchvision rounds."""
    _, h, w = x.shape
    batch = x.unsqueeze(0)
    native = _uint8_resize_is_native()
    if batch.is_contiguous(memory_format=torch.channels_last):
        # Keep the output channels-last, as torchvision does (pytorch/pytorch#68430).
        batch = batch.as_strided((1, 3, h, w), (x.numel(), *batch.stride()[1:]))
    if not native:
        batch = batch.float()
    batch = torch.nn.functional.interpolate(
        batch, size=[new_h, new_w], mode="bilinear", align_corners=False, antialias=True
    )
    if not native:
        batch = batch.round_().to(torch.uint8)
    return batch[0]


def preprocess_image(image: Image.Image, preprocess: dict[str, Any]) -> torch.Tensor:
    """The checkpoint's evaluation transform without torchvision: 3 x size x size float32.

    Same steps and numerics as ``semodel.data.eval_transform`` (torchvision v2): uint8 tensor,
    antialiased bilinear resize of the shorter side, center crop, scale to [0, 1], normalize.
    """
    if preprocess.get("interpolation", "bilinear") != "bilinear":
        raise SemodelError(
            f"checkpoint preprocessing uses {preprocess['interpolation']!r}; only bilinear is supported"
        )
    import numpy as np

    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # CHW view of HWC memory
    _, h, w = x.shape
    new_h, new_w = resized_size(h, w, int(preprocess["resize"]))
    if (new_h, new_w) != (h, w):
        x = _resize_uint8(x, new_h, new_w)
        h, w = new_h, new_w
    size = int(preprocess["image_size"])
    top, left = crop_box(h, w, size)
    x = x[:, top : top + size, left : left + size]
    x = x.to(torch.float32).mul_(1.0 / 255)
    mean = torch.as_tensor(preprocess["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(preprocess["std"], dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def model_view_box(width: int, height: int, preprocess: dict[str, Any]) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of the original image that the model's input shows."""
    new_h, new_w = resized_size(height, width, int(preprocess["resize"]))
    size = int(preprocess["image_size"])
    top, left = crop_box(new_h, new_w, size)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy
