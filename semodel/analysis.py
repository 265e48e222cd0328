"""What a set of predictions says, with its uncertainty: the metrics with bootstrap intervals (per
image, resampling patients when the images have groups), per-patient metrics, the binary operating
points and calibration. ``semodel eval``, the run report and ``semodel cv`` print the same figures.

Also the per-image prediction table (``test_predictions.csv``, ``eval --predictions``) and the
calibration a run stores in its best.pt (temperature and operating threshold, fitted on the
validation split at the end of training).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from semodel.data import Sample, group_of
from semodel.errors import SemodelError
from semodel.files import write_text_atomic
from semodel.stats import (
    bootstrap_intervals,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    group_probabilities,
    operating_threshold,
)

# The metrics reported with intervals, in the order tables show them: (key, title).
METRICS = (
    ("acc", "accuracy"),
    ("balanced_acc", "balanced accuracy"),
    ("f1_macro", "macro-F1"),
    ("auc", "ROC-AUC"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
)
LEVEL = 0.95


def groups_of(samples: Sequence[Sample], group_by: str | None) -> list[str] | None:
    """The group (patient) of every image by the run's ``data.split.group_by``, or None without it."""
    if not group_by:
        return None
    pattern = re.compile(group_by)
    return [group_of(s.path, pattern) for s in samples]


def estimates(probs, targets, classes, groups, resamples: int, seed: int, threshold=None) -> dict[str, Any]:
    """``bootstrap_intervals`` as plain data: ``{metric: {value, low, high, resamples}}``."""
    found = bootstrap_intervals(probs, targets, classes, groups, resamples, seed, LEVEL, threshold)
    return {key: asdict(estimate) for key, estimate in found.items()}


def analyse(
    probs: torch.Tensor,
    targets: torch.Tensor,
    classes: list[str],
    groups: list[str] | None,
    calibration: dict[str, Any] | None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the reports print about one set of predictions (plain data, for JSON).

    - ``intervals``: the metrics with 95% percentile bootstrap intervals; ``resampled`` says whether
      images or groups (patients) were drawn;
    - ``by_group`` (with groups): the same per group, each group's probabilities averaged;
    - ``operating_points`` (two classes): sensitivity, specificity, PPV, NPV at 0.5 and at the
      threshold the run chose on its validation split;
    - ``calibration``: expected calibration error, and after the stored temperature when there is one.
    """
    if resamples < 0:
        raise SemodelError(f"--ci {resamples}: the number of bootstrap resamples must be 0 (off) or more")
    out: dict[str, Any] = {
        "level": LEVEL,
        "resamples": resamples,
        "resampled": "groups" if groups is not None else "images",
        "intervals": estimates(probs, targets, classes, groups, resamples, seed),
    }
    if groups is not None:
        rows = group_probabilities(probs, targets, groups)
        out["by_group"] = {
            "groups": len(rows.ids),
            "mixed_label_groups": [str(g) for g in rows.mixed],
            "intervals": estimates(rows.probs, rows.targets, classes, None, resamples, seed),
        }
    threshold = (calibration or {}).get("threshold")
    if len(classes) == 2:
        points = {"0.5": estimates(probs, targets, classes, groups, resamples, seed, 0.5)}
        if threshold is not None:
            points["val"] = estimates(probs, targets, classes, groups, resamples, seed, threshold)
        out["operating_points"] = {"threshold": threshold, "points": points}
    out["calibration"] = calibration_summary(probs, targets, calibration)
    return out


def calibration_summary(
    probs: torch.Tensor, targets: torch.Tensor, calibration: dict[str, Any] | None
) -> dict:
    summary: dict[str, Any] = {"ece": expected_calibration_error(probs.double(), targets)}
    temperature = (calibration or {}).get("temperature")
    if temperature is not None:
        scaled = apply_temperature(probs, temperature)
        summary.update(
            temperature=temperature, ece_calibrated=expected_calibration_error(scaled.double(), targets)
        )
    return summary


# ----------------------------------------------------------------------------- calibration


def apply_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Probabilities of logits divided by ``temperature``, computed from the probabilities themselves
    (log p and the logits differ by a constant per row, which softmax ignores)."""
    return torch.softmax(torch.log(probs.double().clamp_min(1e-12)) / temperature, dim=1).to(probs.dtype)


def fit_calibration(probs: torch.Tensor, targets: torch.Tensor, target_sensitivity: float | None) -> dict:
    """What a run stores in best.pt from its validation predictions: the temperature (Guo et al.
    2017) and, for two classes, the operating threshold (Youden's J, or the largest threshold
    that reaches ``target_sensitivity``), with the ECE before and after the temperature."""
    temperature = fit_temperature(torch.log(probs.double().clamp_min(1e-12)), targets)
    calibration: dict[str, Any] = {
        "fitted_on": "val",
        "images": int(targets.numel()),
        "temperature": temperature,
        "ece_before": expected_calibration_error(probs.double(), targets),
        "ece_after": expected_calibration_error(apply_temperature(probs, temperature).double(), targets),
        "threshold": None,
        "threshold_rule": None,
    }
    if probs.shape[1] == 2 and (targets == 0).any() and (targets == 1).any():
        rule = "youden" if target_sensitivity is None else float(target_sensitivity)
        calibration["threshold"] = operating_threshold(probs.double(), targets, rule)
        calibration["threshold_rule"] = "youden" if rule == "youden" else f"sensitivity >= {rule:g}"
    return calibration


def reliability_data(probs: torch.Tensor, targets: torch.Tensor, calibration: dict | None):
    """The reliability diagram's bins, before and (with a stored temperature) after calibration."""
    before = calibration_bins(probs.double(), targets)
    temperature = (calibration or {}).get("temperature")
    after = calibration_bins(apply_temperature(probs, temperature).double(), targets) if temperature else None
    return before, after


# ----------------------------------------------------------------------------- prediction tables


def prediction_rows(
    samples: Sequence[Sample], classes: list[str], probs: torch.Tensor, groups: list[str] | None
) -> list[list[str]]:
    """``path, group, true, predicted, p_<class>...`` per image (the header first)."""
    header = ["path", "group", "true", "predicted", *(f"p_{c}" for c in classes)]
    rows = [header]
    predicted = probs.argmax(1).tolist()
    for i, s in enumerate(samples):
        group = groups[i] if groups is not None else ""
        values = [f"{p:.6f}" for p in probs[i].tolist()]
        rows.append([s.path, group, classes[s.label], classes[predicted[i]], *values])
    return rows


def write_predictions(path: Path, rows: list[list[str]]) -> Path:
    text = io.StringIO(newline="")
    csv.writer(text, lineterminator="\n").writerows(rows)
    return write_text_atomic(path, text.getvalue())


def read_predictions(path: Path, classes: list[str]) -> tuple[list[Sample], torch.Tensor, list[str]]:
    """The samples (labels in ``classes`` order), probabilities and groups of a predictions CSV."""
    index = {c: i for i, c in enumerate(classes)}
    samples, probs, groups = [], [], []
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for row in csv.DictReader(f):
                samples.append(Sample(row["path"], index[row["true"]], "test", row["group"]))
                probs.append([float(row[f"p_{c}"]) for c in classes])
                groups.append(row["group"])
    except (KeyError, ValueError, csv.Error) as e:
        raise SemodelError(f"{path}: not a semodel predictions file ({e})") from None
    if not samples:
        raise SemodelError(f"{path}: holds no predictions")
    return samples, torch.tensor(probs), groups


def most_confidently_wrong(probs: torch.Tensor, targets: torch.Tensor, n: int) -> list[int]:
    """The rows of the ``n`` wrong predictions made with the highest probability, most confident first."""
    predicted = probs.argmax(1)
    wrong = (predicted != targets).nonzero().flatten()
    confidence = probs[wrong, predicted[wrong]]
    return wrong[confidence.argsort(descending=True)[:n]].tolist()
