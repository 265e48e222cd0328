"""What a run tells the user: console lines, the TensorBoard stream, and the epoch summary line."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

from semodel.errors import SemodelError, first_line


def log_line(message: str) -> None:
    """One line on stdout, flushed at once: logs of a run in the background stay current."""
    print(message, flush=True)


def say(message: str) -> None:
    """A note or warning on stderr, flushed (stdout stays for the command's result)."""
    print(message, file=sys.stderr, flush=True)


def quiet(message: str) -> None:
    """A log function that drops everything (ranks other than 0, library callers that want silence)."""


class Logger:
    """The run's TensorBoard event stream (one, in the run folder); a no-op when disabled."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.writer = SummaryWriter(str(run_dir), purge_step=purge_step)
            except OSError as e:
                raise SemodelError(
                    f"cannot write TensorBoard events into {run_dir} ({e.strerror or first_line(e)}); "
                    "free the disk or set log.tensorboard: false"
                ) from None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)

    def confusion(self, matrix, classes, step: int) -> None:
        if self.writer:
            from semodel.plots import close, confusion_figure

            fig = confusion_figure(matrix, classes, f"validation, epoch {step}")
            self.writer.add_figure("val/confusion_matrix", fig, step)
            close(fig)

    def samples(self, images: torch.Tensor, mean, std) -> None:
        if self.writer:
            from torchvision.utils import make_grid

            images = images[:32].float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(
                1, 3, 1, 1
            )
            self.writer.add_image("train/augmented_samples", make_grid(images.clamp(0, 1), nrow=8), 0)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            # Written into this run's own stream (SummaryWriter.add_hparams would open a new one).
            exp, ssi, sei = hparams_summary(hparams, metrics)
            fw = self.writer._get_file_writer()
            for summary in (exp, ssi, sei):
                fw.add_summary(summary)
            self.scalars(metrics, 0)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def flat_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The scalar settings of a config as TensorBoard hparams (``model.name``, ``optim.lr``, ...)."""
    out = {}
    for section in ("model", "optim", "schedule", "train", "data"):
        for key, value in config[section].items():
            if isinstance(value, (int, float, str, bool)):
                out[f"{section}.{key}"] = value
    return out


def epoch_scalars(
    train: dict[str, float], val: dict[str, Any], lr: float, epoch_time: float
) -> dict[str, float]:
    return {
        "train/loss": train["loss"],
        "train/acc": train["acc"],
        "val/loss": val["loss"],
        "val/acc": val["acc"],
        "val/balanced_acc": val["balanced_acc"],
        "val/f1_macro": val["f1_macro"],
        "val/auc": val["auc"],
        "lr": lr,
        "perf/images_per_s": train["images_per_s"],
        "perf/epoch_time_s": epoch_time,
    }


def open_fraction(widths: dict[str, dict[str, int]]) -> float:
    """Share of the learned SE blocks' starting parameters that are still open (units weighted by 2C)."""
    total = sum(w["start"] * w["channels"] for w in widths.values())
    return sum(w["width"] * w["channels"] for w in widths.values()) / max(total, 1)


def width_scalars(widths: dict[str, dict[str, int]]) -> dict[str, float]:
    """TensorBoard scalars for learned widths: per block, and the open share of all SE parameters."""
    scalars = {f"attention/width/{name}": float(w["width"]) for name, w in widths.items()}
    scalars["attention/open_fraction"] = open_fraction(widths)
    return scalars
