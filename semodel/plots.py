"""Evaluation figures (matplotlib, Agg backend): confusion matrix, ROC curves, training curves,
reliability diagram and a grid of images (e.g. the most confidently wrong ones)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from semodel.stats import CalibrationBins, auc_score, roc_curve


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no window, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def close(fig) -> None:
    pyplot().close(fig)


def confusion_figure(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str = "confusion matrix"
):
    """Counts, with the share of each true class (row) under them; colour by that share."""
    import numpy as np

    plt = pyplot()
    cm = np.asarray(matrix, dtype=np.int64)
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(2.0 + 0.8 * n, 1.6 + 0.8 * n), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            color = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    close(fig)
    return path


def save_eval_plots(
    folder: Path,
    matrix: Sequence[Sequence[int]],
    probs: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    calibration: dict[str, Any] | None = None,
) -> list[Path]:
    """``confusion_matrix.png``, ``roc.png`` (a curve per class; binary: class 1) and
    ``reliability.png`` (before, and with a stored temperature after, temperature scaling)."""
    from semodel.analysis import reliability_data

    folder.mkdir(parents=True, exist_ok=True)
    before, after = reliability_data(probs, targets, calibration)
    figures = {
        "confusion_matrix.png": confusion_figure(matrix, classes),
        "roc.png": roc_curves_figure(probs, targets, classes),
        "reliability.png": reliability_figure(before, before.ece, after.ece if after else None, after),
    }
    return [save_figure(fig, folder / name) for name, fig in figures.items()]


# ---------------------------------------------------------------------------------------- run report


def history_series(history: Sequence[dict[str, Any]], split: str, key: str) -> list[float]:
    """One metric per epoch of ``metrics.json``'s history; NaN (a gap in the line) where missing."""
    values = []
    for entry in history:
        value = (entry.get(split) or {}).get(key)
        if value is None and key == "lr":
            value = entry.get("lr")  # tolerate the learning rate beside "train" too
        values.append(math.nan if value is None else float(value))
    return values


def curves_figure(history: Sequence[dict[str, Any]], best_epoch: int | None = None):
    """Loss, accuracy (and balanced accuracy) and learning rate per epoch, train and val.

    ``history`` is ``metrics.json``'s list of ``{"epoch", "train": {...}, "val": {...}}``; a metric
    missing from an epoch leaves a gap, and a run that recorded no learning rate says so in that
    panel instead of drawing an empty one. ``best_epoch`` draws a dotted line at the kept weights.
    """
    plt = pyplot()
    epochs = [entry["epoch"] for entry in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    panels = {
        "loss": [("train", "loss", "train loss"), ("val", "loss", "val loss")],
        "accuracy": [
            ("train", "acc", "train accuracy"),
            ("val", "acc", "val accuracy"),
            ("train", "balanced_acc", "train balanced accuracy"),
            ("val", "balanced_acc", "val balanced accuracy"),
        ],
    }
    for ax, (title, lines) in zip(axes[:2], panels.items(), strict=True):
        for split, key, label in lines:
            values = history_series(history, split, key)
            if not all(math.isnan(v) for v in values):
                style = "-" if split == "train" else "--" if key != "balanced_acc" else ":"
                ax.plot(epochs, values, style, marker="o", ms=3, label=label)
        ax.set_title(title)
        ax.legend(fontsize=8)
    lr = history_series(history, "train", "lr")
    if all(math.isnan(v) for v in lr):
        axes[2].text(
            0.5,
            0.5,
            "learning rate not recorded",
            ha="center",
            va="center",
            color="grey",
            transform=axes[2].transAxes,
        )
        axes[2].set_xticks([])
        axes[2].set_yticks([])
    else:
        axes[2].plot(epochs, lr, marker="o", ms=3)
        positive = [v for v in lr if v > 0]
        if positive and min(positive) < max(positive) / 20:  # warm-up or decay over decades
            axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls=":", lw=1)
    fig.tight_layout()
    return fig


def roc_curves_figure(probs: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]):
    """ROC curves with their AUC in the legend: binary, class 1 against class 0; more classes, one
    curve per class against the rest (a class without images, or with all of them, has no curve)."""
    plt = pyplot()
    probs, targets = torch.as_tensor(probs).double(), torch.as_tensor(targets).long()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    shown = [1] if len(classes) == 2 else range(len(classes))
    for k in shown:
        positive = targets == k
        auc = auc_score(probs[:, k], positive)
        if auc is None:
            ax.plot([], [], " ", label=f"{classes[k]}: no curve (not both outcomes in the data)")
            continue
        fpr, tpr, _ = roc_curve(probs[:, k], positive)
        ax.plot(fpr.numpy(), tpr.numpy(), lw=2, label=f"{classes[k]}: AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC ({classes[1]} = positive)" if len(classes) == 2 else "ROC, one class vs the rest")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(
    bins: CalibrationBins,
    ece_before: float,
    ece_after: float | None = None,
    bins_after: CalibrationBins | None = None,
):
    """Reliability diagram (Guo et al. 2017, fig. 1): accuracy per confidence bin against the
    diagonal of perfect calibration, the gap shaded, and below it how many images each bin holds.

    ``bins`` are drawn as bars; ``bins_after`` (e.g. after temperature scaling) as a line on top.
    """
    import numpy as np

    plt = pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    lower, upper = np.array(bins.lower), np.array(bins.upper)
    centre, width = (lower + upper) / 2, upper - lower
    accuracy = np.array([np.nan if a is None else a for a in bins.accuracy])
    confidence = np.array([np.nan if c is None else c for c in bins.confidence])
    top.bar(centre, accuracy, width, edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
    top.bar(centre, confidence - accuracy, width, bottom=accuracy, color="tab:red", alpha=0.3, label="gap")
    if bins_after is not None:
        after = [np.nan if a is None else a for a in bins_after.accuracy]
        top.plot(centre, after, "o-", color="tab:green", label="accuracy after temperature scaling")
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    scaled = f" -> {ece_after:.3f} after temperature scaling" if ece_after is not None else ""
    top.set_title(f"ECE {ece_before:.3f}{scaled}", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centre, bins.count, width, edgecolor="black", color="grey")
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("images")
    fig.tight_layout()
    return fig


@dataclass
class GridCell:
    """One image of a grid: an H x W x 3 (or H x W) array, uint8 or floats in [0, 1], e.g. an image
    or its Grad-CAM overlay, and the lines of its title (true class, prediction, probability)."""

    image: Any
    lines: Sequence[str]


def as_rgb_array(image: Any):
    """An H x W x 3 / H x W array for ``imshow``: C x H x W tensors turned round, floats clipped."""
    import numpy as np

    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array if array.dtype == np.uint8 else np.clip(array.astype(np.float64), 0, 1)


def image_grid_figure(cells: Sequence[GridCell], columns: int = 4, title: str | None = None):
    """Images in a grid, each under its title lines (e.g. "true: melanoma", "predicted: nevus",
    "p = 0.97"); an empty list gives a small figure that says there is nothing to show."""
    plt = pyplot()
    if not cells:
        fig, ax = plt.subplots(figsize=(4, 1.2), dpi=100)
        ax.text(0.5, 0.5, "no images to show", ha="center", va="center", color="grey", transform=ax.transAxes)
        ax.axis("off")
        return fig
    columns = max(1, min(columns, len(cells)))
    rows = math.ceil(len(cells) / columns)
    lines = max(len(cell.lines) for cell in cells)
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns, (2.6 + 0.2 * lines) * rows), dpi=100, squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, cell in zip(axes.flat, cells, strict=False):  # more axes than cells
        image = as_rgb_array(cell.image)
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title("\n".join(cell.lines), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
