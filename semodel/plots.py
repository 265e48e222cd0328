"""Evaluation figures (matplotlib, Agg backend): confusion matrix and binary ROC curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


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


def roc_figure(fpr: torch.Tensor, tpr: torch.Tensor, auc: float | None, positive: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    label = f"AUC = {auc:.4f}" if auc is not None else None
    ax.plot(fpr.numpy(), tpr.numpy(), lw=2, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC ({positive} = positive)")
    if label:
        ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    close(fig)
    return path


def save_eval_plots(
    folder: Path, metrics: dict[str, Any], probs: torch.Tensor, targets: torch.Tensor, classes: list[str]
) -> list[Path]:
    """``confusion_matrix.png``, and ``roc.png`` for a binary task with both classes present."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        save_figure(confusion_figure(metrics["confusion_matrix"], classes), folder / "confusion_matrix.png")
    ]
    if len(classes) == 2 and metrics.get("auc") is not None:
        from torchmetrics.functional.classification import binary_roc

        fpr, tpr, _ = binary_roc(probs[:, 1].float(), targets.long())
        written.append(save_figure(roc_figure(fpr, tpr, metrics["auc"], classes[1]), folder / "roc.png"))
    return written
