"""The uncached loaders' dataset: images read and transformed one at a time, unreadable ones skipped."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from semodel.data.images import UNREADABLE, load_rgb, usable_cpus, warn_skipped
from semodel.data.scan import Sample


class ImageList:
    """A map-style dataset over (path, label) pairs; unreadable files yield None (skipped by collate)."""

    def __init__(self, root: Path, samples: Sequence[Sample], transform: Callable):
        self.root = Path(root)
        self.items = [(s.path, s.label) for s in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        try:
            image = load_rgb(self.root / path)
        except UNREADABLE as e:
            warn_skipped(self.root / path, e)
            return None
        return self.transform(image), label


def collate_skip_bad(batch):
    import torch
    from torch.utils.data import default_collate

    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(batch)


def default_workers(device_type: str) -> int:
    cpus = usable_cpus()
    if device_type == "cpu":
        # On a CPU the model needs the cores; a worker only pays off on larger machines.
        return 0 if cpus <= 4 else min(4, cpus // 4)
    return max(0, min(8, cpus - 1))
