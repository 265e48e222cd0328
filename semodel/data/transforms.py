"""The torchvision transforms: evaluation (resize, centre crop) and training (random resized crop,
flips, the optional per-image augmentations)."""

from __future__ import annotations

from typing import Any


def eval_transform(preprocess: dict[str, Any]):
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(preprocess["resize"], antialias=True),
            v2.CenterCrop(preprocess["image_size"]),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(preprocess["mean"], preprocess["std"]),
        ]
    )


def train_transform(cfg: Any):
    import torch
    from torchvision.transforms import v2

    a = cfg.data.augment
    steps: list[Any] = [
        v2.ToImage(),
        v2.RandomResizedCrop(cfg.data.image_size, scale=tuple(a.scale), antialias=True),
    ]
    if a.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(a.hflip))
    if a.vflip > 0:
        steps.append(v2.RandomVerticalFlip(a.vflip))
    if a.auto_augment == "trivial":
        steps.append(v2.TrivialAugmentWide())
    elif a.auto_augment == "rand":
        steps.append(v2.RandAugment())
    if a.color_jitter > 0:
        j = a.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.data.mean), list(cfg.data.std))]
    if a.random_erasing > 0:
        steps.append(v2.RandomErasing(a.random_erasing))
    return v2.Compose(steps)
