"""What a run iterates over: the epoch batch sampler and the training and validation loaders
(DataLoader workers, or the decode-once cache of ``semodel.data.cache``), and evaluation loaders."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from semodel.data import Dataset, ImageList, Sample, collate_skip_bad, default_workers, eval_transform
from semodel.data.cache import FREE_SHARE, available_ram, cached_loaders, photo_sizes
from semodel.data.cache import choose as choose_cache
from semodel.distributed import World
from semodel.errors import SemodelError


class EpochBatchSampler(Sampler[list[int]]):
    """Batches in a fresh order every epoch, reproducible from (seed, epoch), sharded over ranks.

    The epoch's order is cut into batches of ``batch_size``; rank r of W takes batches
    r, r + W, r + 2W, ... (the batch count is padded to a multiple of W by repeating the first
    batches, so every rank makes the same number of steps). W processes with batch B thus see
    exactly the micro-batches of one process with batch B and ``accum_steps`` W (when the batch
    count is a multiple of W: else the padding repeats some, and the last accumulation is short).
    ``set_epoch(epoch, start)`` skips this rank's first ``start`` batches (resume mid-epoch).
    With ``weights`` the order is drawn with replacement in proportion to them (``balance: sampler``).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, world: World = World(), weights: torch.Tensor | None = None
    ) -> None:
        self.n, self.batch_size, self.seed, self.weights = n, batch_size, seed, weights
        self.rank, self.world = world.rank, world.size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(self.n, generator=g).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        batches += batches[: (-len(batches)) % self.world]
        return batches[self.rank :: self.world]

    def __iter__(self):
        return iter(self.batches()[self.start :])

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.batch_size) / self.world) - self.start


@dataclass
class Loaders:
    """A run's training and validation batches; ``loader_kw`` builds more loaders (the final test)."""

    train: Any  # DataLoader or semodel.data.cache.CachedBatches
    val: Any
    sampler: EpochBatchSampler
    loader_kw: dict[str, Any] = field(default_factory=dict)


def loader_options(workers: int, device: torch.device) -> dict[str, Any]:
    """DataLoader settings: unreadable images skipped, pinned memory for CUDA, workers kept alive."""
    options: dict[str, Any] = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        collate_fn=collate_skip_bad,
    )
    if workers > 0:
        options["prefetch_factor"] = 4
    return options


def eval_loader(
    root: Path, samples: Sequence[Sample], preprocess: dict[str, Any], batch_size: int, **options
):
    """Batches of ``samples`` prepared as the checkpoint's evaluation transform, in order; unreadable
    images are skipped (``options``: further DataLoader settings, e.g. ``loader_options``)."""
    options.setdefault("collate_fn", collate_skip_bad)
    # Each iteration of a DataLoader draws its worker seed from the global random stream unless it
    # has a generator of its own. Evaluation draws nothing else, so it must not move that stream:
    # a resumed run, whose kept validation batches (KeptBatches) are read again once, would
    # otherwise continue from other random numbers than the straight run.
    options.setdefault("generator", torch.Generator())
    return DataLoader(
        ImageList(root, samples, eval_transform(preprocess)), batch_size, shuffle=False, **options
    )


def build_loaders(
    cfg: Any, data: Dataset, device: torch.device, world: World, log: Callable[[str], None]
) -> Loaders:
    """The training batches (sharded over ranks) and this rank's share of the validation images.

    Each rank evaluates every W-th validation image; the caller gathers the predictions before
    metrics, so that they cover every validation image exactly once.
    """
    from semodel.data import train_transform
    from semodel.preprocess import preprocess_of

    train, val = data.split("train"), data.split("val")
    if len(val) < world.size:
        raise SemodelError(
            f"{len(val)} validation images for {world.size} processes: each process needs at "
            "least one; use fewer processes or a larger data.split.val"
        )
    weights = None
    if cfg.data.balance == "sampler":
        counts = torch.tensor(data.counts("train"), dtype=torch.float)
        weights = (1.0 / counts)[torch.tensor([s.label for s in train])]
    sampler = EpochBatchSampler(len(train), cfg.data.batch_size, cfg.train.seed, world, weights)
    workers = cfg.data.num_workers if cfg.data.num_workers != "auto" else default_workers(device.type)
    options = loader_options(workers, device)
    val_share = val[world.rank :: world.size]
    plan = choose_cache(cfg, device, lambda: photo_sizes(data.root, train, data.sizes), len(val_share))
    log(
        f"data: {data.root}  classes: {', '.join(data.classes)}  "
        f"train/val/test: {len(train)}/{len(val)}/{len(data.split('test'))}  "
        f"image_size: {cfg.data.image_size} px  "
        + (
            plan.why
            if plan.kind != "none"
            else f"workers: {workers}" + ("" if cfg.data.cache == "none" else f"  {plan.why}")
        )
        + (f"  processes: {world.size} x batch {cfg.data.batch_size}" if world.distributed else "")
    )
    if plan.kind != "none":  # decode once; crop per image from the kept pixels (semodel/data/cache.py)
        train_batches, val_batches = cached_loaders(
            cfg, plan, data.root, train, val_share, sampler, device, log
        )
        return Loaders(train_batches, val_batches, sampler, options)
    train_loader = DataLoader(
        ImageList(data.root, train, train_transform(cfg)), batch_sampler=sampler, **options
    )
    val_loader = eval_loader(data.root, val_share, preprocess_of(cfg), cfg.data.batch_size * 2, **options)
    return Loaders(train_loader, KeptBatches(val_loader, int(FREE_SHARE * available_ram())), sampler, options)


class KeptBatches:
    """The validation batches, read and decoded in the first full pass and then kept in memory
    (up to ``limit`` bytes, else read again every pass).

    The eval transform draws nothing, so every pass yields the same tensors: keeping them changes
    no result, and validation then costs the forward passes only, as in ``data.cache`` runs and in
    a plain loop over pre-decoded tensors. A pass that stops early keeps nothing.
    """

    def __init__(self, loader: DataLoader, limit: int) -> None:
        self.loader, self.limit = loader, limit
        self.kept: list[Any] | None = None
        self.too_large = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.kept is not None:
            yield from self.kept
            return
        kept, size = [], 0
        for batch in self.loader:
            if not self.too_large:
                size += sum(t.numel() * t.element_size() for t in batch if isinstance(t, torch.Tensor))
                if size > self.limit:
                    self.too_large, kept = True, []
                else:
                    kept.append(batch)
            yield batch
        if not self.too_large:
            self.kept = kept


def make_mixer(cfg: Any, num_classes: int):
    """Batch-level mixup / cutmix (torchvision v2), or None."""
    from torchvision.transforms import v2

    choices = []
    if cfg.data.mixup > 0:
        choices.append(v2.MixUp(alpha=cfg.data.mixup, num_classes=num_classes))
    if cfg.data.cutmix > 0:
        choices.append(v2.CutMix(alpha=cfg.data.cutmix, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
