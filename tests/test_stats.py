"""semodel.stats against slow, obviously-correct references.

The vectorised bootstrap replays the very resamples of ``resample_indices`` in a plain Python loop
(lists of image indices, counted metrics, a pairwise AUC, numpy's percentile), so the two must
agree to float rounding. Speed is measured by ``scripts/bench_stats.py``, not here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semodel import stats
from semodel.errors import SemodelError
from semodel.stats import Estimate, bootstrap_intervals


def synthetic(n: int, classes: int, seed: int = 0, signal: float = 1.5, decimals: int | None = 1):
    """Probabilities with some skill; rounded so that tied scores occur (the AUC must handle them)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(classes, (n,), generator=g)
    probs = (
        torch.randn(n, classes, generator=g, dtype=torch.float64) + signal * torch.eye(classes)[targets]
    ).softmax(1)
    if decimals is not None:
        probs = torch.round(probs, decimals=decimals)
    return probs, targets


# ------------------------------------------------------------------------------------------ references


def pairwise_auc(scores: list[float], positive: list[bool]) -> float:
    """P(positive scores higher) + half the ties, over all pairs: the definition itself."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def share(num: int, den: int) -> float:
    return num / den if den else math.nan


def reference_metrics(probs, targets, preds, images: list[int]) -> dict[str, float]:
    """Every metric of the images ``images`` (repeats allowed), by counting."""
    c = probs.shape[1]
    y = [int(targets[i]) for i in images]
    p = [int(preds[i]) for i in images]
    tp = [sum(1 for a, b in zip(y, p, strict=True) if a == b == k) for k in range(c)]
    support = [y.count(k) for k in range(c)]
    called = [p.count(k) for k in range(c)]
    present = all(support)
    out = {
        "acc": sum(a == b for a, b in zip(y, p, strict=True)) / len(y),
        "balanced_acc": sum(tp[k] / support[k] for k in range(c)) / c if present else math.nan,
        "f1_macro": sum(2 * tp[k] / (support[k] + called[k]) for k in range(c)) / c if present else math.nan,
    }
    if c == 2:
        out["auc"] = pairwise_auc([float(probs[i, 1]) for i in images], [v == 1 for v in y])
        out["sensitivity"] = share(tp[1], support[1])
        out["specificity"] = share(tp[0], support[0])
        out["ppv"] = share(tp[1], called[1])
        out["npv"] = share(tp[0], called[0])
    else:
        per_class = [
            pairwise_auc([float(probs[i, k]) for i in images], [v == k for v in y]) for k in range(c)
        ]
        out["auc"] = sum(per_class) / c
    return out


def reference_intervals(probs, targets, preds, groups, resamples, seed, level) -> dict[str, Estimate]:
    """Loop over the same resamples: draw units, expand groups to their images, count, take percentiles."""
    units = list(dict.fromkeys(groups)) if groups is not None else list(range(len(targets)))
    members = {
        u: [i for i in range(len(targets)) if (groups[i] if groups is not None else i) == u] for u in units
    }
    indices = stats.resample_indices(len(units), resamples, seed)
    rows = []
    for draw in indices.tolist():
        images = [i for u in draw for i in members[units[u]]]
        rows.append(reference_metrics(probs, targets, preds, images))
    point = reference_metrics(probs, targets, preds, list(range(len(targets))))
    out = {}
    for name, value in point.items():
        defined = [r[name] for r in rows if not math.isnan(r[name])]
        tail = (1 - level) / 2 * 100
        low, high = np.percentile(defined, [tail, 100 - tail]) if defined else (None, None)
        out[name] = Estimate(None if math.isnan(value) else value, low, high, len(defined))
    return out


def assert_same(got: Estimate, want: Estimate, name: str) -> None:
    assert got.resamples == want.resamples, name
    for field in ("value", "low", "high"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), (name, field, a, b)
        if a is not None:
            assert a == pytest.approx(b, rel=1e-12, abs=1e-12), (name, field)


# ------------------------------------------------------------------------------------------ bootstrap


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("grouped", [False, True])
def test_vectorised_intervals_equal_a_loop_over_the_same_resamples(classes, grouped):
    probs, targets = synthetic(36, classes, seed=classes)
    groups = [f"patient{i // 3}" for i in range(36)] if grouped else None
    names = [f"c{k}" for k in range(classes)]
    got = bootstrap_intervals(probs, targets, names, groups, resamples=150, seed=7, level=0.9)
    want = reference_intervals(probs, targets, probs.argmax(1), groups, 150, 7, 0.9)
    assert set(got) == set(want)
    for name in want:
        assert_same(got[name], want[name], name)


def test_a_threshold_sets_the_operating_point_of_every_thresholded_metric():
    probs, targets = synthetic(30, 2, seed=3)
    got = bootstrap_intervals(probs, targets, ["a", "b"], resamples=100, seed=1, threshold=0.3)
    preds = (probs[:, 1] >= 0.3).long()
    want = reference_intervals(probs, targets, preds, None, 100, 1, 0.95)
    for name in want:
        assert_same(got[name], want[name], name)
    rates = stats.binary_rates(probs, targets, 0.3)
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        assert got[name].value == pytest.approx(rates[name])


def test_point_estimates_match_the_torchmetrics_metrics_of_evaluate():
    from semodel.metrics import classification_metrics

    for classes in (2, 4):
        probs, targets = synthetic(200, classes, seed=classes, decimals=None)
        names = [f"c{k}" for k in range(classes)]
        got = bootstrap_intervals(probs, targets, names, resamples=0)
        want = classification_metrics(probs, targets, names)
        for name in ("acc", "balanced_acc", "f1_macro", "auc"):
            assert got[name].value == pytest.approx(want[name], abs=1e-6), name
            assert got[name].low is None and got[name].resamples == 0


def test_auc_matches_a_pairwise_reference_with_ties():
    probs, targets = synthetic(80, 2, seed=5, decimals=1)
    scores = probs[:, 1]
    assert len(set(scores.tolist())) < 40  # plenty of ties
    want = pairwise_auc(scores.tolist(), (targets == 1).tolist())
    assert stats.auc_score(scores, targets == 1) == pytest.approx(want, rel=1e-12)
    fpr, tpr, thresholds = stats.roc_curve(scores, targets == 1)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(want, rel=1e-12)
    assert math.isinf(thresholds[0]) and bool((thresholds[1:].diff() < 0).all())
    assert stats.auc_score(scores, torch.ones(80, dtype=torch.bool)) is None


def width(estimate: Estimate) -> float:
    return estimate.high - estimate.low


def test_intervals_narrow_as_the_number_of_images_grows():
    widths = []
    for n in (100, 400, 1600):
        probs, targets = synthetic(n, 2, seed=n, decimals=None)
        result = bootstrap_intervals(probs, targets, ["a", "b"], resamples=500)
        widths.append({name: width(e) for name, e in result.items()})
    for name in widths[0]:
        # 1/sqrt(n): each quadrupling roughly halves the width.
        assert widths[1][name] < 0.75 * widths[0][name], name
        assert widths[2][name] < 0.75 * widths[1][name], name


def test_resampling_patients_keeps_their_images_together():
    """All errors in one patient: per image they look like scattered luck, per patient the whole
    error rate hinges on whether that one patient is drawn, so the interval is much wider."""
    n, size = 200, 10
    targets = torch.tensor([i % 2 for i in range(n)])
    probs = torch.nn.functional.one_hot(targets, 2).double() * 0.8 + 0.1
    probs[:size] = probs[:size].flip(1)  # patient 0: every image wrong
    patients = [i // size for i in range(n)]
    per_image = bootstrap_intervals(probs, targets, ["a", "b"], resamples=1000)
    per_patient = bootstrap_intervals(probs, targets, ["a", "b"], patients, resamples=1000)
    assert per_image["acc"].value == per_patient["acc"].value == 0.95
    assert width(per_patient["acc"]) > 1.5 * width(per_image["acc"])
    # A resample's accuracy is 1 - 10k/200 (k = draws of patient 0), so the bounds are such steps.
    for bound in (per_patient["acc"].low, per_patient["acc"].high):
        assert (1 - bound) * n / size == pytest.approx(round((1 - bound) * n / size))


def test_one_image_per_group_is_the_image_bootstrap():
    probs, targets = synthetic(50, 3, seed=2)
    images = bootstrap_intervals(probs, targets, ["a", "b", "c"], resamples=200, seed=4)
    groups = bootstrap_intervals(probs, targets, ["a", "b", "c"], [f"g{i}" for i in range(50)], 200, 4)
    assert images == groups


def test_resamples_without_a_class_are_dropped_for_class_averaged_metrics_and_counted():
    probs, targets = synthetic(40, 2, seed=1, decimals=None)
    targets[:] = 0
    targets[5] = 1  # one positive image: absent from about 1 - 1/e of the resamples
    result = bootstrap_intervals(probs, targets, ["neg", "pos"], resamples=1000, seed=3)
    drawn = (stats.resample_indices(40, 1000, seed=3) == 5).any(1)
    for name in ("balanced_acc", "f1_macro", "auc", "sensitivity"):
        assert result[name].resamples == int(drawn.sum()), name
    assert result["acc"].resamples == result["specificity"].resamples == 1000
    assert 550 < int(drawn.sum()) < 720


def test_metrics_undefined_on_the_data_are_none_and_no_resample_defines_them():
    probs, targets = synthetic(20, 3, seed=1)
    targets[targets == 2] = 0  # class 2 has no image
    result = bootstrap_intervals(probs, targets, ["a", "b", "c"], resamples=50)
    assert result["balanced_acc"] == Estimate(None, None, None, 0)
    assert result["auc"] == Estimate(None, None, None, 0)
    assert result["acc"].value is not None and result["acc"].resamples == 50


def test_a_lower_level_gives_a_narrower_interval_inside_the_wider_one():
    probs, targets = synthetic(100, 2, seed=9)
    wide = bootstrap_intervals(probs, targets, ["a", "b"], resamples=400, level=0.95)
    narrow = bootstrap_intervals(probs, targets, ["a", "b"], resamples=400, level=0.5)
    for name in wide:
        assert wide[name].low <= narrow[name].low <= narrow[name].high <= wide[name].high


def test_an_estimate_prints_as_value_and_interval():
    assert str(Estimate(0.8512, 0.8, 0.9, 1000)) == "0.851 (0.800-0.900)"
    assert str(Estimate(0.5)) == "0.500"
    assert str(Estimate(None)) == "n/a"


# ------------------------------------------------------------------------------------------ patients


def test_group_probabilities_average_each_patient_and_take_the_majority_label():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.1, 0.9]])
    targets = torch.tensor([0, 0, 1, 1, 0, 1])
    rows = stats.group_probabilities(probs, targets, ["p1", "p1", "p2", "p2", "p2", "p3"])
    assert rows.ids == ["p1", "p2", "p3"]
    assert torch.allclose(rows.probs, torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]], dtype=torch.float64))
    assert rows.targets.tolist() == [0, 1, 1]
    assert rows.images.tolist() == [2, 3, 1]
    assert rows.mixed == ["p2"]


def test_a_tied_patient_label_goes_to_the_lowest_class_and_is_flagged():
    probs = torch.full((4, 3), 1 / 3)
    rows = stats.group_probabilities(probs, torch.tensor([2, 1, 2, 1]), ["a", "a", "a", "a"])
    assert rows.targets.tolist() == [1]
    assert rows.mixed == ["a"]


# ------------------------------------------------------------------------------------------ calibration


def test_ece_on_a_hand_computed_example():
    # Confidences 0.6 (right), 0.6 (wrong), 0.9 (right), 0.9 (right); 10 bins.
    probs = torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.9, 0.1], [0.1, 0.9]], dtype=torch.float64)
    targets = torch.tensor([0, 0, 0, 1])
    bins = stats.calibration_bins(probs, targets, bins=10)
    # bin (0.5, 0.6]: acc 0.5, conf 0.6; bin (0.8, 0.9]: acc 1, conf 0.9 -> 0.5*0.1 + 0.5*0.1
    assert bins.ece == pytest.approx(0.1)
    assert sum(bins.count) == 4 and bins.count[5] == 2 and bins.count[8] == 2
    assert bins.accuracy[5] == pytest.approx(0.5) and bins.confidence[8] == pytest.approx(0.9)
    assert bins.accuracy[0] is None and bins.confidence[0] is None
    assert bins.lower[0] == 0 and bins.upper[-1] == 1
    assert stats.expected_calibration_error(probs, targets, bins=10) == bins.ece


def calibrated_sample(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary predictions whose confidence is exactly the chance of being right."""
    g = torch.Generator().manual_seed(seed)
    p1 = torch.rand(n, generator=g, dtype=torch.float64)
    targets = (torch.rand(n, generator=g, dtype=torch.float64) < p1).long()
    return torch.stack([1 - p1, p1], 1), targets


def test_ece_is_small_for_calibrated_and_large_for_overconfident_predictions():
    probs, targets = calibrated_sample(20000, seed=0)
    assert stats.expected_calibration_error(probs, targets) < 0.02
    sharpened = (probs.log() * 4).softmax(1)  # same ranking, far too sure
    assert stats.expected_calibration_error(sharpened, targets) > 0.15


def test_fit_temperature_recovers_a_known_temperature():
    """Labels drawn from softmax(true_logits); the model reports true_logits * T, so dividing by the
    fitted temperature should give back the true logits: fitted ~ T."""
    g = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(8000, 4, generator=g, dtype=torch.float64)
    targets = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    for t_true in (0.5, 2.5):
        fitted = stats.fit_temperature(true_logits * t_true, targets)
        assert fitted == pytest.approx(t_true, rel=0.08)


def test_fit_temperature_lowers_the_nll_and_works_under_inference_mode():
    probs, targets = calibrated_sample(2000, seed=1)
    logits = (probs.log() * 3).float()
    with torch.inference_mode():
        t = stats.fit_temperature(logits, targets)
    nll = torch.nn.functional.cross_entropy
    assert nll(logits.double() / t, targets) < nll(logits.double(), targets)
    assert t == pytest.approx(3, rel=0.15)


def test_fit_temperature_is_clamped_for_perfectly_separated_logits():
    logits = torch.tensor([[0.01, -0.01], [-0.01, 0.01]] * 10)  # right, but barely: T -> 0 is optimal
    targets = torch.tensor([0, 1] * 10)
    assert stats.fit_temperature(logits, targets) == stats.TEMPERATURE_RANGE[0]


# ------------------------------------------------------------------------------------------ thresholds

# Positives score 0.9, 0.8, 0.6, 0.35; negatives 0.7, 0.4, 0.3, 0.2, 0.1. Youden's J per threshold:
# 0.9: .25, 0.8: .5, 0.7: .3, 0.6: .55, 0.4: .35, 0.35: .6 (best), 0.3: .4, 0.2: .2, 0.1: 0.
SCORES = torch.tensor([0.9, 0.8, 0.6, 0.35, 0.7, 0.4, 0.3, 0.2, 0.1])
LABELS = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0])


def test_youden_threshold_on_a_constructed_example():
    assert stats.operating_threshold(SCORES, LABELS) == pytest.approx(0.35)
    probs = torch.stack([1 - SCORES, SCORES], 1)
    assert stats.operating_threshold(probs, LABELS, "youden") == pytest.approx(0.35)


def test_youden_ties_go_to_the_largest_threshold():
    scores = torch.tensor([0.9, 0.5, 0.8, 0.2])  # J = 0.5 at 0.9 and at 0.5
    assert stats.operating_threshold(scores, torch.tensor([1, 1, 0, 0])) == pytest.approx(0.9)


@pytest.mark.parametrize("target, threshold", [(0.5, 0.8), (0.75, 0.6), (0.7, 0.6), (1.0, 0.35)])
def test_the_largest_threshold_reaching_a_target_sensitivity(target, threshold):
    assert stats.operating_threshold(SCORES, LABELS, target) == pytest.approx(threshold)


def test_binary_rates_count_at_the_threshold():
    rates = stats.binary_rates(SCORES, LABELS, 0.6)
    assert (rates["tp"], rates["fn"], rates["fp"], rates["tn"]) == (3, 1, 1, 4)
    assert rates["sensitivity"] == 0.75 and rates["specificity"] == 0.8
    assert rates["ppv"] == 0.75 and rates["npv"] == 0.8
    nothing_called = stats.binary_rates(SCORES, LABELS, 0.95)
    assert nothing_called["ppv"] is None and nothing_called["npv"] == pytest.approx(5 / 9)


# ------------------------------------------------------------------------------------------ bad input

PROBS, TARGETS = synthetic(10, 2)
BAD_CALLS = [
    (lambda: bootstrap_intervals(PROBS, TARGETS, ["a", "b"], resamples=-1), "resamples must be"),
    (lambda: bootstrap_intervals(PROBS, TARGETS, ["a", "b"], resamples=2.5), "resamples must be"),
    (lambda: bootstrap_intervals(PROBS, TARGETS, ["a", "b"], level=1.0), "level must lie"),
    (lambda: bootstrap_intervals(PROBS, TARGETS, ["a", "b"], level=0), "level must lie"),
    (lambda: bootstrap_intervals(PROBS, TARGETS[:9], ["a", "b"]), "9 labels for 10 predictions"),
    (lambda: bootstrap_intervals(PROBS, TARGETS, ["a", "b"], groups=["g"] * 9), "9 group ids for 10"),
    (lambda: bootstrap_intervals(PROBS, TARGETS, ["a", "b", "c"]), "3 class names for 2 columns"),
    (lambda: bootstrap_intervals(PROBS, TARGETS + 5, ["a", "b"]), "labels must lie in 0..1"),
    (lambda: bootstrap_intervals(PROBS[:0], TARGETS[:0], ["a", "b"]), "no predictions"),
    (lambda: bootstrap_intervals(PROBS[:, 0], TARGETS, ["a"]), "N x C table"),
    (lambda: bootstrap_intervals(PROBS, TARGETS, ["a", "b"], threshold=1.5), "threshold must lie"),
    (lambda: bootstrap_intervals(*synthetic(10, 3), ["a", "b", "c"], threshold=0.5), "exactly two classes"),
    (lambda: bootstrap_intervals(PROBS * math.nan, TARGETS, ["a", "b"]), "NaN or infinite"),
    (lambda: stats.calibration_bins(PROBS, TARGETS, bins=0), "bins must be"),
    (lambda: stats.fit_temperature(PROBS[:, 0], TARGETS), "logits must be"),
    (lambda: stats.fit_temperature(PROBS * math.inf, TARGETS), "NaN or infinite"),
    (lambda: stats.operating_threshold(PROBS, torch.zeros(10, dtype=torch.long)), "both classes"),
    (lambda: stats.operating_threshold(PROBS, TARGETS, "best"), "rule must be"),
    (lambda: stats.operating_threshold(PROBS, TARGETS, 0.0), "rule must be"),
    (lambda: stats.operating_threshold(*synthetic(10, 3)), "exactly two classes"),
    (lambda: stats.group_probabilities(PROBS, TARGETS, ["g"] * 11), "11 group ids for 10"),
]


@pytest.mark.parametrize("call, message", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_input_raises_a_one_line_error(call, message):
    with pytest.raises(SemodelError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_fit_temperature_takes_tensors_made_under_inference_mode():
    """predict_probs returns inference tensors; the fit must still differentiate through a copy."""
    with torch.inference_mode():
        logits = torch.randn(40, 3, generator=torch.Generator().manual_seed(3)) * 4
        targets = logits.argmax(1)
    assert stats.TEMPERATURE_RANGE[0] <= stats.fit_temperature(logits, targets) <= stats.TEMPERATURE_RANGE[1]
