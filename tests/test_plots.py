"""The report's figures: each writes a real PNG of a plausible size, and the ROC legend quotes the
AUCs that semodel.stats (and torchmetrics) compute."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from semodel import plots, stats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (the first one, right after the signature)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_plausible_png(
    path: Path, min_side: int = 200, max_side: int = 3000, min_bytes: int = 5000
) -> None:
    width, height = png_size(path)
    assert min_side <= width <= max_side and min_side <= height <= max_side, (width, height)
    assert path.stat().st_size >= min_bytes  # something is drawn, not a blank canvas


def history(epochs: int = 6, with_lr: bool = True) -> list[dict]:
    out = []
    for e in range(1, epochs + 1):
        train = {"loss": 1 / e, "acc": 1 - 0.5 / e, "images_per_s": 100.0}
        if with_lr:
            train["lr"] = 1e-3 * 0.5 ** (e - 1)
        val = {"loss": 1.2 / e, "acc": 0.9 - 0.4 / e, "balanced_acc": 0.85 - 0.4 / e, "f1_macro": 0.8}
        out.append({"epoch": e, "train": train, "val": val})
    return out


@pytest.mark.parametrize("with_lr", [True, False])
def test_curves_figure_writes_a_png_with_and_without_a_learning_rate(tmp_path, with_lr):
    fig = plots.curves_figure(history(with_lr=with_lr), best_epoch=5)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert ("learning rate not recorded" in texts) is (not with_lr)
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["train accuracy", "val accuracy", "val balanced accuracy"]
    assert_plausible_png(plots.save_figure(fig, tmp_path / "curves.png"))


def test_curves_figure_tolerates_a_missing_metric_in_one_epoch(tmp_path):
    runs = history(3)
    del runs[1]["val"]["balanced_acc"]
    fig = plots.curves_figure(runs)
    line = [ln for ln in fig.axes[1].lines if ln.get_label() == "val balanced accuracy"][0]
    assert math.isnan(line.get_ydata()[1])
    assert_plausible_png(plots.save_figure(fig, tmp_path / "curves.png"))


def legend_aucs(fig) -> dict[str, float]:
    found = {}
    for text in fig.axes[0].get_legend().get_texts():
        match = re.fullmatch(r"(.+): AUC = ([0-9.]+)", text.get_text())
        if match:
            found[match[1]] = float(match[2])
    return found


def scores(n: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(classes, (n,), generator=g)
    probs = (torch.randn(n, classes, generator=g) + 1.2 * torch.eye(classes)[targets]).softmax(1)
    return probs, targets


def test_binary_roc_figure_has_one_curve_with_the_computed_auc(tmp_path):
    from torchmetrics.functional.classification import binary_auroc

    probs, targets = scores(300, 2)
    fig = plots.roc_curves_figure(probs, targets, ["benign", "malignant"])
    want = binary_auroc(probs[:, 1], targets).item()
    assert legend_aucs(fig) == {"malignant": round(want, 3)}
    point = stats.bootstrap_intervals(probs, targets, ["benign", "malignant"], resamples=0)["auc"].value
    assert point == pytest.approx(want, abs=1e-6)
    assert_plausible_png(plots.save_figure(fig, tmp_path / "roc.png"))


def test_multiclass_roc_figure_has_one_vs_rest_curves_with_the_computed_aucs(tmp_path):
    from torchmetrics.functional.classification import binary_auroc

    probs, targets = scores(300, 4, seed=1)
    names = ["a", "b", "c", "d"]
    fig = plots.roc_curves_figure(probs, targets, names)
    want = {
        name: round(binary_auroc(probs[:, k], (targets == k).long()).item(), 3)
        for k, name in enumerate(names)
    }
    assert legend_aucs(fig) == want
    macro = stats.bootstrap_intervals(probs, targets, names, resamples=0)["auc"].value
    assert macro == pytest.approx(
        np.mean([binary_auroc(probs[:, k], (targets == k).long()).item() for k in range(4)])
    )
    assert_plausible_png(plots.save_figure(fig, tmp_path / "roc.png"))


def test_a_class_without_images_gets_no_curve_but_a_legend_line():
    probs, targets = scores(60, 3, seed=2)
    targets[targets == 2] = 0
    fig = plots.roc_curves_figure(probs, targets, ["a", "b", "c"])
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert set(legend_aucs(fig)) == {"a", "b"}
    assert any(t.startswith("c: no curve") for t in texts)
    plots.close(fig)


def test_reliability_figure_writes_a_png_before_and_after_scaling(tmp_path):
    probs, targets = scores(500, 3, seed=3)
    sharp = (probs.log() * 3).softmax(1)
    before, after = stats.calibration_bins(sharp, targets), stats.calibration_bins(probs, targets)
    fig = plots.reliability_figure(before, before.ece, after.ece, bins_after=after)
    assert f"{before.ece:.3f} -> {after.ece:.3f}" in fig.axes[0].get_title()
    assert_plausible_png(plots.save_figure(fig, tmp_path / "reliability.png"))
    fig = plots.reliability_figure(before, before.ece)
    assert fig.axes[0].get_title() == f"ECE {before.ece:.3f}"
    assert_plausible_png(plots.save_figure(fig, tmp_path / "reliability_only.png"))


def test_image_grid_figure_shows_arrays_tensors_and_greyscale(tmp_path):
    rng = np.random.default_rng(0)
    cells = [
        plots.GridCell(
            rng.integers(0, 255, (64, 48, 3), dtype=np.uint8), ["true: a", "predicted: b", "p = 0.97"]
        ),
        plots.GridCell(torch.rand(3, 32, 32), ["true: b", "predicted: a", "p = 0.91"]),  # C x H x W
        plots.GridCell(rng.random((40, 40)) * 1.5, ["true: a", "predicted: c", "p = 0.88"]),  # clipped
        plots.GridCell(torch.rand(20, 20, 1), ["true: c", "predicted: a", "p = 0.80"]),
        plots.GridCell(rng.random((30, 30, 3)), ["true: c", "predicted: b", "p = 0.75"]),
    ]
    fig = plots.image_grid_figure(cells, columns=4, title="most confidently wrong")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "true: a\npredicted: b\np = 0.97" and len(titles) == 5
    assert [ax.images[0].get_array().shape[:2] for ax in fig.axes[:5]] == [
        (64, 48),
        (32, 32),
        (40, 40),
        (20, 20),
        (30, 30),
    ]
    assert_plausible_png(plots.save_figure(fig, tmp_path / "wrong.png"))


def test_an_empty_image_grid_says_so(tmp_path):
    fig = plots.image_grid_figure([])
    assert fig.axes[0].texts[0].get_text() == "no images to show"
    assert_plausible_png(plots.save_figure(fig, tmp_path / "none.png"), min_side=100, min_bytes=1000)


@pytest.mark.parametrize("classes", [["a", "b"], ["a", "b", "c"]])
def test_the_eval_plots(tmp_path, classes):
    from semodel.metrics import classification_metrics

    probs, targets = scores(100, len(classes), seed=4)
    matrix = classification_metrics(probs, targets, classes)["confusion_matrix"]
    written = plots.save_eval_plots(tmp_path, matrix, probs, targets, classes, {"temperature": 1.5})
    assert [p.name for p in written] == ["confusion_matrix.png", "roc.png", "reliability.png"]
    for path in written:
        assert_plausible_png(path)
