"""Where a training run's wall time went: a few named parts, timed with ``time.perf_counter`` only.

A ``Budget`` starts with the run (``fit``'s start) and ends after the final test. Each part is the
time the main process spent in it; ``other`` is the wall time no part claims (the gaps between
them), so the parts and ``other`` add up to the wall time::

    startup      fit's start to the first epoch: data scan and split, loaders (and data.cache
                 decoding), model, optimizer, resumed state, run folder
    data_wait    blocked in the training loader's ``__next__`` (decoding, augmentation, workers)
    train_step   the rest of the training loop: forward, backward, optimizer step, the loss
                 bookkeeping and its syncs at the progress cadence
    ema          the EMA update after each optimizer step
    validation   the validation split's forward passes after each epoch (with the loss and the
                 softmax, and the gathering of the ranks' predictions)
    val_data     blocked in the validation loader: reading and decoding the images (the first
                 epoch, without data.cache), making the batches
    val_metrics  the validation metrics from the predictions (torchmetrics; its import once)
    checkpoint   the main thread's share of the checkpoint writes: the CPU snapshot of the state
                 and waiting for the previous background write
    logging      the epoch's records: history, console line, TensorBoard scalars and figures
    final_test   after the last epoch: best.pt loaded and tested, metrics.json, hparams
    other        wall time not in any part above

``checkpoint_background`` (not part of the sum) is the time the background writer thread spent
serialising and syncing checkpoints while training went on.

No part synchronises the device. On a CPU every part is exact. On CUDA, kernels run
asynchronously: a part's time is how long the host spent in it, and GPU work queued by the
training step is paid wherever the host next waits for it. Hence the rule: ``data_wait`` is only
the time blocked in the loader, and ``train_step`` is the remainder of the training loop (the
progress syncs, where the host waits for the queued steps, are inside it); ``ema`` then counts
the EMA's launch time, its GPU time lands in ``train_step``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

PARTS = (
    "startup",
    "data_wait",
    "train_step",
    "ema",
    "validation",
    "val_data",
    "val_metrics",
    "checkpoint",
    "logging",
    "final_test",
)
LABELS = {
    "train_step": "train step",
    "data_wait": "data wait",
    "final_test": "final test",
    "val_data": "validation data",
    "val_metrics": "validation metrics",
}


class Budget:
    """Seconds per part of a run; ``started``: the run's start as a ``time.time()`` value."""

    def __init__(self, started: float | None = None) -> None:
        now = time.perf_counter()
        self.origin = now if started is None else now - max(0.0, time.time() - started)
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.background = 0.0  # checkpoint writes on the writer thread (overlaps the parts)

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Count the block's time to ``name``, less what parts inside it counted (the final test
        waits for the last checkpoint write: that wait is ``checkpoint``'s). Once per epoch or so:
        a generator per call."""
        since = self.mark()
        try:
            yield
        finally:
            self.rest_to(name, since)

    def wall(self) -> float:
        return time.perf_counter() - self.origin

    def counted(self) -> float:
        return sum(self.seconds.values())

    def mark(self) -> tuple[float, float]:
        """Now, and the time counted so far: ``rest_to`` gives a part what came after it."""
        return time.perf_counter(), self.counted()

    def rest_to(self, part: str, since: tuple[float, float]) -> None:
        """Count to ``part`` the time since ``since`` (a ``mark``) that no other part counted."""
        t0, counted = since
        self.seconds[part] += max(0.0, (time.perf_counter() - t0) - (self.counted() - counted))

    def fill(self, part: str) -> None:
        """Count to ``part`` all the wall time so far that no part counted (e.g. the startup)."""
        self.seconds[part] += max(0.0, self.wall() - self.counted())

    def report(self) -> dict[str, float]:
        """Seconds per part, ``other``, ``wall`` and ``checkpoint_background`` (for metrics.json)."""
        wall = self.wall()
        out = {part: round(s, 3) for part, s in self.seconds.items()}
        out["other"] = round(max(0.0, wall - self.counted()), 3)
        out["wall"] = round(wall, 3)
        out["checkpoint_background"] = round(self.background, 3)
        return out

    def summary(self) -> str:
        """Two lines: the wall time and its parts with their shares, largest first."""
        report = self.report()
        wall = max(report["wall"], 1e-9)
        parts = [(p, report[p]) for p in (*PARTS, "other")]
        parts.sort(key=lambda item: -item[1])
        shown = ", ".join(f"{LABELS.get(p, p)} {s:.1f}s ({s / wall:.0%})" for p, s in parts if s >= 0.05)
        step, validation = report["train_step"] / wall, report["validation"] / wall
        return (
            f"time budget: {wall:.1f}s wall: training step {step:.0%}, validation forward passes "
            f"{validation:.0%}, the rest {1 - step - validation:.0%}; checkpoint writes "
            f"{report['checkpoint_background']:.1f}s in the background\n  {shown}"
        )


def timed(batches: Iterable[Any], budget: Budget, part: str = "data_wait") -> Iterator[Any]:
    """``batches``, with the time blocked in each ``next`` counted to ``part``."""
    iterator = iter(batches)
    clock, seconds = time.perf_counter, budget.seconds
    while True:
        t0 = clock()
        try:
            item = next(iterator)
        except StopIteration:
            seconds[part] += clock() - t0
            return
        seconds[part] += clock() - t0
        yield item
