"""``semodel eval``: metrics of a checkpoint on its run's held-out split or on any ImageFolder
(which images: ``semodel.evalsets``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from semodel.checkpoint import build_from_checkpoint, load_checkpoint, uses_ema, weights_label
from semodel.errors import SemodelError
from semodel.evalsets import EvalSet, folder_eval_set, run_eval_set
from semodel.files import refuse_overwrite, write_json
from semodel.runlog import say
from semodel.runtime import predict_probs, resolve_device
from semodel.tables import align


@dataclass
class EvalOptions:
    """How to evaluate (``semodel eval``'s options besides the checkpoint and the images)."""

    split: str = "auto"  # auto (test, else val), train, val, test or all
    device: str = "auto"
    batch_size: int = 64
    use_ema: bool | None = None  # None: the weights the run selected (EMA with train.ema)
    tta: bool = False  # average with the horizontally flipped image
    workers: int | None = None  # DataLoader processes (None: by device)
    progress: bool = False


@dataclass
class EvalResult:
    report: dict[str, Any]  # what --output writes
    probs: torch.Tensor  # N x C
    targets: torch.Tensor  # N


def evaluate_checkpoint(
    checkpoint: Path,
    data: Path | None = None,
    options: EvalOptions | None = None,
    images: EvalSet | None = None,
    log: Callable[[str], None] = say,
) -> EvalResult:
    """Metrics of ``checkpoint`` on the run's own split, on the ImageFolder ``data``, or on
    ``images`` (a list chosen by the caller: ``semodel cv`` tests each fold on its own images)."""
    from semodel.data import default_workers
    from semodel.loaders import eval_loader
    from semodel.metrics import classification_metrics

    o = options or EvalOptions()
    if o.batch_size < 1:
        raise SemodelError(f"--batch-size {o.batch_size}: must be at least 1")
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    classes = list(state["classes"])
    dev = resolve_device(o.device)
    model = build_from_checkpoint(state, use_ema=o.use_ema, source=str(checkpoint)).to(dev)
    if images is None:
        images = (
            folder_eval_set(Path(data), classes, o.split)
            if data is not None
            else run_eval_set(state, checkpoint, o.split)
        )
    workers = default_workers(dev.type) if o.workers is None else o.workers
    loader = eval_loader(
        images.root,
        images.samples,
        state["preprocess"],
        o.batch_size,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    probs, targets, loss = predict_probs(model, loader, dev, tta=o.tta, progress=o.progress)
    metrics = classification_metrics(probs, targets, classes)
    metrics["loss"] = loss
    report = {
        "checkpoint": str(checkpoint),
        "model": state["config"]["model"]["name"],
        "epoch": state.get("epoch"),
        "weights": "ema" if uses_ema(state, o.use_ema) else "model",
        "weights_note": weights_label(state, o.use_ema),
        "tta": "hflip" if o.tta else None,
        "device": str(dev),
        "data": {
            "root": str(images.root),
            "source": images.source,
            "split": images.split,
            "listed": len(images.samples),
            "evaluated": int(targets.numel()),
        },
        "classes": classes,
        "metrics": metrics,
    }
    return EvalResult(report, probs, targets)


# ----------------------------------------------------------------------------- report


def format_report(report: dict[str, Any]) -> str:
    m, d, classes = report["metrics"], report["data"], report["classes"]
    epoch = f", epoch {report['epoch']}" if report.get("epoch") is not None else ""
    skipped = d["listed"] - d["evaluated"]
    weights = report.get("weights_note") or report["weights"]
    lines = [
        f"checkpoint  {report['checkpoint']}  ({report['model']}{epoch})",
        f"weights     {weights}",
        f"data        {d['root']}",
        f"images      {d['source']}: {d['evaluated']} images"
        + (f" ({skipped} unreadable, skipped)" if skipped else ""),
        f"device      {report['device']}  tta: {report['tta'] or 'off'}",
        "",
    ]
    c = len(classes)
    auc_name = "ROC-AUC" if c == 2 else "ROC-AUC (one-vs-rest, macro)"
    auc = f"{m['auc']:.4f}" if m.get("auc") is not None else "n/a (a class has no image)"
    summary = [
        ["accuracy", f"{m['acc']:.4f}"],
        ["balanced accuracy", f"{m['balanced_acc']:.4f}"],
        [auc_name, auc],
    ]
    summary += [[f"top-{k} accuracy", f"{m[f'top{k}_acc']:.4f}"] for k in range(2, c) if f"top{k}_acc" in m]
    summary.append(["loss (cross-entropy)", f"{m['loss']:.4f}"])
    lines += align(summary) + [""]

    rows = [["class", "precision", "recall", "f1-score", "support"]]
    for name in classes:
        pc = m["per_class"][name]
        rows.append(
            [name, f"{pc['precision']:.4f}", f"{pc['recall']:.4f}", f"{pc['f1']:.4f}", str(pc["support"])]
        )
    for avg in ("macro", "weighted"):
        rows.append(
            [
                f"{avg} avg",
                f"{m[f'precision_{avg}']:.4f}",
                f"{m[f'recall_{avg}']:.4f}",
                f"{m[f'f1_{avg}']:.4f}",
                str(m["n"]),
            ]
        )
    lines += align(rows) + [""]

    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    cm = [["true \\ predicted", *classes]] + [
        [name, *map(str, row)] for name, row in zip(classes, m["confusion_matrix"], strict=True)
    ]
    lines += align(cm)
    return "\n".join(lines) + "\n"


def eval_from_cli(
    checkpoint: Path, data: Path | None, options: EvalOptions, output: Path | None, plot: Path | None
) -> dict[str, Any]:
    if output is not None and output.is_dir():
        raise SemodelError(
            f"--output {output} is a folder; give a file name such as {output / 'metrics.json'}"
        )
    if output is not None:
        refuse_overwrite(output, "--output", {"the checkpoint": Path(checkpoint)})
    if plot is not None and plot.exists() and not plot.is_dir():
        raise SemodelError(f"--plot {plot} is a file; give a folder for the PNG files")
    options.progress = sys.stderr.isatty()
    result = evaluate_checkpoint(checkpoint, data, options)
    sys.stdout.write(format_report(result.report))
    if output is not None:
        write_json(output, result.report)
        say(f"wrote {output}")
    if plot is not None:
        from semodel.plots import save_eval_plots

        written = save_eval_plots(
            plot, result.report["metrics"], result.probs, result.targets, result.report["classes"]
        )
        say(f"wrote {', '.join(str(p) for p in written)}")
    return result.report
