"""Numbers a reader can trust: bootstrap intervals (per image or per patient), patient-level rows,
calibration (ECE, temperature scaling) and a binary operating threshold.

Plain torch in float64 on the CPU, no torchmetrics: every number here can be re-derived by a few
lines of Python, and ``tests/test_stats.py`` does exactly that.

Conventions that the report relies on:

- **Positive class.** For two classes the positive class is index 1, and an image is called
  positive when ``p(class 1) >= threshold``; without a threshold the prediction is the argmax
  (ties go to class 0).
- **Undefined values.** A metric that divides by a count a resample can leave at zero (a class
  missing from the resample's labels, PPV without a positive prediction) is undefined in that
  resample. Such resamples are dropped *for that metric only*; ``Estimate.resamples`` says how
  many were used, so a report can show "(based on 812 of 1000 resamples)". The class-averaged
  metrics (balanced accuracy, macro-F1, ROC-AUC) need every class among the resample's labels.
- **Percentile bootstrap** (Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13):
  the interval is the (1 - level)/2 and (1 + level)/2 quantiles of the resampled metric, with
  linear interpolation (numpy's default). With groups (patients) whole groups are drawn with
  replacement, the cluster bootstrap (Davison & Hinkley 1997, *Bootstrap Methods and their
  Application*, sec. 3.8), because images of one patient are not independent evidence.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from semodel.errors import SemodelError

F64 = torch.float64
# fit_temperature's result is clamped to this range: perfectly separated validation logits drive
# the NLL-optimal temperature towards 0, which would make every later prediction certain.
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass(frozen=True)
class Estimate:
    """A metric on all the data (``value``) and its bootstrap percentile interval ``[low, high]``.

    ``value`` is None where the metric is undefined on the data itself (a class with no image);
    ``low``/``high`` are None without resamples or when no resample defined the metric;
    ``resamples`` counts the resamples the interval rests on (see "Undefined values" above).
    """

    value: float | None
    low: float | None = None
    high: float | None = None
    resamples: int = 0

    def __str__(self) -> str:
        if self.value is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.value:.3f}"
        return f"{self.value:.3f} ({self.low:.3f}-{self.high:.3f})"


@dataclass(frozen=True)
class GroupRows:
    """One row per group (patient): mean probabilities, majority label, number of images.

    ``mixed`` lists the groups whose images carry more than one label: their majority label is a
    simplification the report should mention.
    """

    ids: list[Hashable]
    probs: torch.Tensor  # G x C
    targets: torch.Tensor  # G
    images: torch.Tensor  # G
    mixed: list[Hashable]


@dataclass(frozen=True)
class CalibrationBins:
    """Equal-width top-label confidence bins ``(lower, upper]`` and the ECE they sum to.

    ``accuracy`` and ``confidence`` are None for empty bins (a reliability diagram leaves a gap).
    """

    lower: list[float]
    upper: list[float]
    count: list[int]
    accuracy: list[float | None]
    confidence: list[float | None]
    ece: float


# ---------------------------------------------------------------------------------------- input checks


def check_probs(probs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs`` as an N x C float64 table and ``targets`` as N class indices, or a one-line error."""
    probs = torch.as_tensor(probs).detach().cpu().to(F64)
    targets = torch.as_tensor(targets).detach().cpu().long()
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise SemodelError(
            f"probabilities must be an N x C table with C >= 2, got shape {tuple(probs.shape)}"
        )
    if not bool(probs.isfinite().all()):
        raise SemodelError("probabilities contain NaN or infinite values")
    return probs, check_targets(targets, len(probs), probs.shape[1])


def check_targets(targets: torch.Tensor, n: int, classes: int) -> torch.Tensor:
    if targets.ndim != 1 or len(targets) != n:
        raise SemodelError(f"{targets.numel()} labels for {n} predictions: the lengths must match")
    if n == 0:
        raise SemodelError("no predictions to evaluate")
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= classes:
        raise SemodelError(f"labels must lie in 0..{classes - 1}, found {low if low < 0 else high}")
    return targets


def check_options(resamples: int, level: float, classes: int, threshold: float | None) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 0:
        raise SemodelError(f"resamples must be a whole number >= 0, got {resamples!r}")
    if not 0 < level < 1:
        raise SemodelError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    if threshold is not None and classes != 2:
        raise SemodelError(f"a threshold needs exactly two classes, got {classes}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise SemodelError(f"threshold must lie in [0, 1], got {threshold!r}")


def group_index(groups: Sequence[Hashable], n: int) -> tuple[torch.Tensor, list[Hashable]]:
    """Each image's group as 0..G-1 (in order of first appearance), and the group ids."""
    if len(groups) != n:
        raise SemodelError(f"{len(groups)} group ids for {n} predictions: the lengths must match")
    ids = list(dict.fromkeys(groups))
    position = {g: i for i, g in enumerate(ids)}
    return torch.tensor([position[g] for g in groups], dtype=torch.long), ids


# ---------------------------------------------------------------------------------------- bootstrap


def resample_indices(units: int, resamples: int, seed: int = 0) -> torch.Tensor:
    """``resamples x units`` draws with replacement from ``0..units-1`` (images, or groups).

    Public so that a test can replay exactly the resamples ``bootstrap_intervals`` used.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(units, (resamples, units), generator=generator)


def resample_counts(indices: torch.Tensor, units: int) -> torch.Tensor:
    """How often each unit (image or group) is drawn in each resample (resamples x units, float64).

    Counting draws turns every metric into a weighted one of fixed shape, so all resamples are
    computed at once; a group drawn twice brings its images twice.
    """
    counts = torch.zeros(indices.shape[0], units, dtype=F64)
    return counts.scatter_add_(1, indices, torch.ones(1, 1, dtype=F64).expand(indices.shape))


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, NaN (undefined) where ``den`` is 0."""
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


def predictions(probs: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Argmax, or for two classes ``p(class 1) >= threshold``."""
    if threshold is None:
        return probs.argmax(1)
    return (probs[:, 1] >= threshold).long()


def weighted_auc(
    scores: torch.Tensor, positive: torch.Tensor, counts: torch.Tensor, unit_of_image: torch.Tensor
) -> torch.Tensor:
    """ROC-AUC per resample (row of ``counts``, image i weighted by ``counts[:, unit_of_image[i]]``):
    the Mann-Whitney statistic (Hanley & McNeil 1982, Radiology 143:29), P(score of a positive >
    score of a negative) with ties counting half.

    The negatives are sorted once; each positive's rank among them (below, and below or tied) is
    a fixed index into the cumulative negative weight of every resample, so no per-resample sort.
    """
    order = torch.argsort(scores[~positive])
    neg_scores, neg_units = scores[~positive][order], unit_of_image[~positive][order]
    cum_neg = F.pad(counts.index_select(1, neg_units).cumsum(1), (1, 0))  # weight of the j lowest
    below = torch.searchsorted(neg_scores, scores[positive], side="left")
    below_or_tied = torch.searchsorted(neg_scores, scores[positive], side="right")
    w_pos = counts.index_select(1, unit_of_image[positive])
    twice_wins = (w_pos * (cum_neg.index_select(1, below) + cum_neg.index_select(1, below_or_tied))).sum(1)
    return ratio(twice_wins / 2, w_pos.sum(1) * cum_neg[:, -1])


def macro_auc(
    probs: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor, unit_of_image: torch.Tensor
) -> torch.Tensor:
    """Binary: AUC of class 1. More classes: the mean one-vs-rest AUC (Fawcett 2006, Pattern
    Recognition Letters 27:861, sec. 9); NaN where a class has no positive or no negative."""
    if probs.shape[1] == 2:
        return weighted_auc(probs[:, 1], targets == 1, counts, unit_of_image)
    per_class = [
        weighted_auc(probs[:, k], targets == k, counts, unit_of_image) for k in range(probs.shape[1])
    ]
    return torch.stack(per_class, 1).mean(1)


def confusion_counts(
    targets: torch.Tensor, preds: torch.Tensor, counts: torch.Tensor, unit_of_image: torch.Tensor, c: int
) -> torch.Tensor:
    """Weighted confusion matrices [resample, true, predicted]: each unit's own cell counts
    (units x C*C) weighted by how often the resample drew it, as one matrix product."""
    unit_cells = torch.zeros(counts.shape[1], c * c, dtype=F64)
    unit_cells.index_put_((unit_of_image, targets * c + preds), torch.ones(len(targets), dtype=F64), True)
    return (counts @ unit_cells).view(-1, c, c)


def metric_table(
    probs: torch.Tensor,
    targets: torch.Tensor,
    preds: torch.Tensor,
    counts: torch.Tensor,
    unit_of_image: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Every metric for every resample (row of ``counts``), NaN where undefined."""
    c = probs.shape[1]
    confusion = confusion_counts(targets, preds, counts, unit_of_image, c)
    true, predicted = confusion.sum(2), confusion.sum(1)
    hits = confusion.diagonal(dim1=1, dim2=2)
    every_class = (true > 0).all(1)
    out = {
        "acc": hits.sum(1) / true.sum(1),
        "balanced_acc": ratio(hits, true).mean(1),
        "f1_macro": torch.where(every_class, ratio(2 * hits, true + predicted).mean(1), math.nan),
        "auc": macro_auc(probs, targets, counts, unit_of_image),
    }
    if c == 2:
        out["sensitivity"] = ratio(hits[:, 1], true[:, 1])
        out["specificity"] = ratio(hits[:, 0], true[:, 0])
        out["ppv"] = ratio(hits[:, 1], predicted[:, 1])
        out["npv"] = ratio(hits[:, 0], predicted[:, 0])
    return out


def percentile_interval(values: torch.Tensor, level: float) -> tuple[float | None, float | None, int]:
    """The percentile interval of the defined (non-NaN) values, and how many there were."""
    defined = values[~values.isnan()]
    if defined.numel() == 0:
        return None, None, 0
    tail = (1 - level) / 2
    low, high = torch.quantile(defined, torch.tensor([tail, 1 - tail], dtype=F64)).tolist()
    return low, high, int(defined.numel())


def bootstrap_intervals(
    probs: Any,
    targets: Any,
    classes: Sequence[str],
    groups: Sequence[Hashable] | None = None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    threshold: float | None = None,
) -> dict[str, Estimate]:
    """Point estimates and percentile bootstrap intervals of ``acc``, ``balanced_acc``, ``f1_macro``,
    ``auc`` and, for two classes, ``sensitivity``, ``specificity``, ``ppv``, ``npv``.

    ``groups`` (one id per image, e.g. the patient) makes the bootstrap draw groups instead of
    images: the values stay per image, the intervals widen to what correlated images really tell.
    (Per-patient metrics: pass the rows of ``group_probabilities`` instead.) ``threshold`` (two
    classes only) sets the operating point of every thresholded metric.
    ``resamples=0`` gives the point estimates alone. All resamples are computed at once from a
    resamples x units table of draw counts (8 MB for 1000 x 1000).
    """
    probs, targets = check_probs(probs, targets)
    if len(classes) != probs.shape[1]:
        raise SemodelError(f"{len(classes)} class names for {probs.shape[1]} columns of probabilities")
    check_options(resamples, level, len(classes), threshold)
    unit_of_image, ids = (
        group_index(groups, len(targets)) if groups is not None else (torch.arange(len(targets)), None)
    )
    preds = predictions(probs, threshold)
    units = len(ids) if ids is not None else len(targets)
    points = metric_table(probs, targets, preds, torch.ones(1, units, dtype=F64), unit_of_image)
    if resamples == 0:
        return {name: Estimate(none_if_nan(v)) for name, v in points.items()}
    counts = resample_counts(resample_indices(units, resamples, seed), units)
    boots = metric_table(probs, targets, preds, counts, unit_of_image)
    return {
        name: Estimate(none_if_nan(points[name]), *percentile_interval(boots[name], level)) for name in points
    }


def none_if_nan(value: torch.Tensor) -> float | None:
    number = float(value.reshape(-1)[0])
    return None if math.isnan(number) else number


# ---------------------------------------------------------------------------------------- patients


def group_probabilities(probs: Any, targets: Any, groups: Sequence[Hashable]) -> GroupRows:
    """One row per group: its images' probabilities averaged, its majority label.

    A tie between labels goes to the lowest class index (``argmax`` takes the first maximum); such
    groups, and any group with more than one label, are listed in ``GroupRows.mixed``.
    """
    probs, targets = check_probs(probs, targets)
    index, ids = group_index(groups, len(targets))
    g, c = len(ids), probs.shape[1]
    images = torch.bincount(index, minlength=g)
    summed = torch.zeros(g, c, dtype=F64).index_add_(0, index, probs)
    votes = torch.zeros(g, c, dtype=torch.long).index_put_(
        (index, targets), torch.ones_like(targets), accumulate=True
    )
    mixed = [ids[i] for i in torch.nonzero((votes > 0).sum(1) > 1).flatten().tolist()]
    return GroupRows(ids, summed / images[:, None], votes.argmax(1), images, mixed)


# ---------------------------------------------------------------------------------------- calibration


def calibration_bins(probs: Any, targets: Any, bins: int = 15) -> CalibrationBins:
    """Top-label reliability bins and ECE (Guo et al. 2017, "On Calibration of Modern Neural
    Networks", ICML, eq. 3): confidence = max probability, equal-width bins ``((m-1)/M, m/M]``,
    ECE = sum over bins of (bin share of images) x |accuracy - mean confidence|."""
    probs, targets = check_probs(probs, targets)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise SemodelError(f"bins must be a whole number >= 1, got {bins!r}")
    confidence, preds = probs.max(1)
    edges = torch.linspace(0, 1, bins + 1, dtype=F64)
    which = torch.bucketize(confidence, edges[1:-1])  # (lower, upper] per bin
    count = torch.bincount(which, minlength=bins)
    correct = torch.zeros(bins, dtype=F64).index_add_(0, which, (preds == targets).to(F64))
    conf_sum = torch.zeros(bins, dtype=F64).index_add_(0, which, confidence)
    accuracy, mean_conf = ratio(correct, count.to(F64)), ratio(conf_sum, count.to(F64))
    gaps = torch.nan_to_num((accuracy - mean_conf).abs()) * count / len(targets)
    return CalibrationBins(
        lower=edges[:-1].tolist(),
        upper=edges[1:].tolist(),
        count=count.tolist(),
        accuracy=[none_if_nan(a) for a in accuracy],
        confidence=[none_if_nan(c) for c in mean_conf],
        ece=float(gaps.sum()),
    )


def expected_calibration_error(probs: Any, targets: Any, bins: int = 15) -> float:
    """Top-label ECE with ``bins`` equal-width bins (Guo et al. 2017); 0 is perfectly calibrated."""
    return calibration_bins(probs, targets, bins).ece


def fit_temperature(logits: Any, targets: Any, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017, sec. 4.2): the one T > 0 minimising the NLL of
    ``softmax(logits / T)`` on validation logits, found by LBFGS on log T (so T stays positive).

    Clamped to ``TEMPERATURE_RANGE``: perfectly separated logits push T towards 0.
    """
    with torch.inference_mode(False), torch.enable_grad():
        logits = torch.as_tensor(logits).detach().cpu().to(F64, copy=True)
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise SemodelError(f"logits must be an N x C table with C >= 2, got shape {tuple(logits.shape)}")
        if not bool(logits.isfinite().all()):
            raise SemodelError("logits contain NaN or infinite values")
        # A copy: the targets of torch.inference_mode (predict_probs) cannot be saved for backward.
        targets = torch.as_tensor(targets).detach().cpu().long().clone()
        targets = check_targets(targets, len(logits), logits.shape[1])
        log_t = torch.zeros((), dtype=F64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), targets)
            loss.backward()
            return loss

        optimizer.step(closure)
        low, high = TEMPERATURE_RANGE
        return min(max(float(log_t.detach().exp()), low), high)


# ---------------------------------------------------------------------------------------- binary tasks


def binary_scores(probs: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """p(class 1) and the positive labels, from an N x 2 table or the N scores themselves."""
    probs = torch.as_tensor(probs).detach().cpu().to(F64)
    if probs.ndim == 2 and probs.shape[1] != 2:
        raise SemodelError(f"a threshold needs exactly two classes, got {probs.shape[1]}")
    if probs.ndim not in (1, 2):
        raise SemodelError(
            f"probabilities must be N scores or an N x 2 table, got shape {tuple(probs.shape)}"
        )
    scores = probs[:, 1] if probs.ndim == 2 else probs
    targets = check_targets(torch.as_tensor(targets).detach().cpu().long(), len(scores), 2)
    return scores, targets == 1


def roc_curve(scores: Any, positive: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """False and true positive rates at each distinct score used as threshold (positive when
    ``score >= threshold``), highest threshold first, starting from (0, 0) at threshold +inf."""
    scores = torch.as_tensor(scores).to(F64)
    positive = torch.as_tensor(positive).bool()
    order = torch.argsort(scores, descending=True)
    s, pos = scores[order], positive[order].to(F64)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last image of each run of equal scores
    zero = torch.zeros(1, dtype=F64)
    tp, fp = torch.cat([zero, pos.cumsum(0)[last]]), torch.cat([zero, (1 - pos).cumsum(0)[last]])
    fpr, tpr = ratio(fp, torch.full_like(fp, fp[-1])), ratio(tp, torch.full_like(tp, tp[-1]))
    return fpr, tpr, torch.cat([torch.tensor([math.inf], dtype=F64), s[last]])


def auc_score(scores: Any, positive: Any) -> float | None:
    """ROC-AUC (Mann-Whitney, ties count half); None without a positive or without a negative."""
    scores = torch.as_tensor(scores).to(F64)
    positive = torch.as_tensor(positive).bool()
    ones = torch.ones(1, len(scores), dtype=F64)
    return none_if_nan(weighted_auc(scores, positive, ones, torch.arange(len(scores))))


def operating_threshold(probs: Any, targets: Any, rule: str | float = "youden") -> float:
    """A threshold on p(class 1) (positive when ``p >= threshold``), chosen among the scores:

    - ``"youden"``: the one maximising Youden's J = sensitivity + specificity - 1 (Youden 1950,
      Cancer 3:32); of equally good ones the largest;
    - a number in (0, 1]: the largest threshold whose sensitivity reaches it.

    Fit it on validation data and report test results at it, never the other way round.
    """
    scores, positive = binary_scores(probs, targets)
    if not bool(positive.any()) or bool(positive.all()):
        raise SemodelError("an operating threshold needs both classes among the labels")
    fpr, tpr, thresholds = roc_curve(scores, positive)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the +inf start point
    if rule == "youden":
        return float(thresholds[torch.argmax(tpr - fpr)])
    if isinstance(rule, bool) or not isinstance(rule, (int, float)) or not 0 < rule <= 1:
        raise SemodelError(f'rule must be "youden" or a target sensitivity in (0, 1], got {rule!r}')
    reached = torch.nonzero(tpr >= rule - 1e-12).flatten()
    return float(thresholds[reached[0]])


def binary_rates(probs: Any, targets: Any, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV at ``threshold`` (positive when ``p(class 1) >= threshold``),
    None where undefined, with the counts ``tp``, ``fp``, ``tn``, ``fn`` they come from."""
    scores, positive = binary_scores(probs, targets)
    called = scores >= threshold
    tp, fp = int((called & positive).sum()), int((called & ~positive).sum())
    fn, tn = int((~called & positive).sum()), int((~called & ~positive).sum())

    def share(num: int, den: int) -> float | None:
        return num / den if den else None

    return {
        "threshold": float(threshold),
        "sensitivity": share(tp, tp + fn),
        "specificity": share(tn, tn + fp),
        "ppv": share(tp, tp + fp),
        "npv": share(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
