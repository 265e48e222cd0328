"""Classification metrics from predicted probabilities, computed with torchmetrics."""

from __future__ import annotations

from typing import Any

import torch


def classification_metrics(probs: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Metrics of ``probs`` (N x C, rows sum to 1) against integer ``targets`` (N).

    Keys: ``acc``, ``balanced_acc`` (mean per-class recall), ``f1_macro``, ``f1_weighted``,
    ``precision_macro``, ``precision_weighted``, ``recall_macro``, ``recall_weighted``,
    ``confusion_matrix`` (rows: true class, columns: predicted; lists of ints), ``per_class``
    ({class: {precision, recall, f1, support}}), ``auc`` (binary ROC-AUC, or one-vs-rest macro;
    None when a class is absent from ``targets``), ``top{k}_acc`` for 1 < k < C, and ``n``.
    """
    from torchmetrics.functional import classification as M

    probs = probs.detach().float().cpu()
    targets = targets.detach().long().cpu()
    c = len(classes)
    kw = dict(num_classes=c, validate_args=False)
    out: dict[str, Any] = {"n": int(targets.numel())}
    out["acc"] = M.multiclass_accuracy(probs, targets, average="micro", **kw).item()
    out["balanced_acc"] = M.multiclass_recall(probs, targets, average="macro", **kw).item()
    out["f1_macro"] = M.multiclass_f1_score(probs, targets, average="macro", **kw).item()
    out["f1_weighted"] = M.multiclass_f1_score(probs, targets, average="weighted", **kw).item()
    for average in ("macro", "weighted"):
        out[f"precision_{average}"] = M.multiclass_precision(probs, targets, average=average, **kw).item()
        out[f"recall_{average}"] = M.multiclass_recall(probs, targets, average=average, **kw).item()
    precision = M.multiclass_precision(probs, targets, average="none", **kw)
    recall = M.multiclass_recall(probs, targets, average="none", **kw)
    f1 = M.multiclass_f1_score(probs, targets, average="none", **kw)
    support = torch.bincount(targets, minlength=c)
    out["per_class"] = {
        name: {
            "precision": precision[i].item(),
            "recall": recall[i].item(),
            "f1": f1[i].item(),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    out["confusion_matrix"] = M.multiclass_confusion_matrix(probs, targets, **kw).tolist()
    present = bool((support > 0).all())
    if not present:
        out["auc"] = None
    elif c == 2:
        out["auc"] = M.binary_auroc(probs[:, 1], targets, validate_args=False).item()
    else:
        out["auc"] = M.multiclass_auroc(probs, targets, average="macro", **kw).item()
    for k in range(2, min(c, 6)):
        out[f"top{k}_acc"] = M.multiclass_accuracy(probs, targets, average="micro", top_k=k, **kw).item()
    return out
