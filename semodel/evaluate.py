"""``semodel eval``: metrics of a checkpoint, with their uncertainty, on its run's held-out split or
on any ImageFolder (which images: ``semodel.evalsets``; the statistics: ``semodel.analysis``).

A cross-validation folder (``semodel cv``) as the checkpoint evaluates the fold ensemble: the mean
of the probabilities of every fold's best model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semodel.analysis import (
    METRICS,
    analyse,
    apply_temperature,
    groups_of,
    prediction_rows,
    write_predictions,
)
from semodel.checkpoint import build_from_checkpoint, load_models, uses_ema, weights_label
from semodel.data import check_image
from semodel.data.duplicates import leak_phrase
from semodel.errors import SemodelError
from semodel.evalsets import EvalSet, folder_eval_set, run_eval_set
from semodel.files import read_json, refuse_overwrite, write_json
from semodel.runlog import say
from semodel.runtime import predict_probs, resolve_device
from semodel.tables import align, metric


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
    resamples: int = 1000  # bootstrap resamples of the 95% intervals (0: no intervals)
    by_group: bool | None = None  # per-patient metrics (None: where data.split.group_by gives groups)
    calibrated: bool = False  # apply the temperature the run fitted on its validation split
    seed: int = 0  # of the bootstrap


@dataclass
class EvalResult:
    report: dict[str, Any]  # what --output writes
    probs: torch.Tensor  # N x C
    targets: torch.Tensor  # N
    images: EvalSet | None = None  # the images, in the order of probs
    groups: list[str] | None = None  # their groups (patients), where the run has data.split.group_by
    states: list[dict[str, Any]] = field(default_factory=list)  # the checkpoint(s), loaded


def evaluate_checkpoint(
    checkpoint: Path,
    data: Path | None = None,
    options: EvalOptions | None = None,
    images: EvalSet | None = None,
    log: Callable[[str], None] = say,
) -> EvalResult:
    """Metrics of ``checkpoint`` (a file, or a cv folder: the fold ensemble) on the run's own split,
    on the ImageFolder ``data``, or on ``images`` (``semodel cv`` tests each fold on its own)."""
    from semodel.metrics import classification_metrics

    o = options or EvalOptions()
    if o.batch_size < 1:
        raise SemodelError(f"--batch-size {o.batch_size}: must be at least 1")
    checkpoint = Path(checkpoint)
    states = load_models(checkpoint)
    state, classes = states[0][1], list(states[0][1]["classes"])
    if images is None and data is None and len(states) > 1:
        raise SemodelError(
            f"{checkpoint} is a cross-validation: pass --data DIR (its folds tested their own images)"
        )
    if images is None:
        images = (
            folder_eval_set(Path(data), classes, o.split)
            if data is not None
            else run_eval_set(state, checkpoint, o.split)
        )
    if data is None and len(states) == 1:
        warn_leakage(checkpoint, images.split, log)
    listed = len(images.samples)
    probs, targets, loss, images = ensemble_probs(states, images, o)
    if o.calibrated:
        probs = calibrated(states, probs)
    metrics = classification_metrics(probs, targets, classes)
    metrics["loss"] = loss
    group_by = state["config"]["data"]["split"].get("group_by") if o.by_group is not False else None
    groups = groups_of(images.samples, group_by)
    calibration = None if o.calibrated or len(states) > 1 else state.get("calibration")
    report = {
        "checkpoint": str(checkpoint),
        "model": state["config"]["model"]["name"],
        "epoch": state.get("epoch") if len(states) == 1 else None,
        "ensemble": [str(path) for path, _ in states] if len(states) > 1 else None,
        "weights": "ema" if uses_ema(state, o.use_ema) else "model",
        "weights_note": weights_label(state, o.use_ema),
        "calibrated": o.calibrated,
        "tta": "hflip" if o.tta else None,
        "device": str(resolve_device(o.device)),
        "data": {
            "root": str(images.root),
            "source": images.source,
            "split": images.split,
            "listed": listed,
            "evaluated": int(targets.numel()),
        },
        "classes": classes,
        "metrics": metrics,
        "analysis": analyse(probs, targets, classes, groups, calibration, o.resamples, o.seed),
    }
    return EvalResult(report, probs, targets, images, groups, [s for _, s in states])


def warn_leakage(checkpoint: Path, split: str, log: Callable[[str], None]) -> None:
    """The run's own split, where training found copies of other splits' images in it (its
    metrics.json ``data.leakage``): the same warning again, since the figures below rest on it."""
    try:
        leakage = read_json(checkpoint.parent / "metrics.json").get("data", {}).get("leakage") or {}
    except (SemodelError, AttributeError):
        return
    found = [
        leak_phrase(pair, v["images"], v["of"])
        for pair, v in leakage.items()
        if pair.startswith(f"{split}-") and isinstance(v, dict) and v.get("images")
    ]
    if found:
        log(
            f"warning: copies across the splits: {', '.join(found)} (exact, or flipped/rotated; found "
            f"when the run started); these figures are optimistic"
        )


def ensemble_probs(
    states: list[tuple[Path, dict[str, Any]]], images: EvalSet, o: EvalOptions
) -> tuple[torch.Tensor, torch.Tensor, float, EvalSet]:
    """The mean probabilities of the checkpoints' models over ``images`` (one model: its own), the
    targets, the mean cross-entropy, and the images in the order of the rows (unreadable ones out)."""
    from semodel.data import default_workers
    from semodel.loaders import eval_loader

    dev = resolve_device(o.device)
    workers = default_workers(dev.type) if o.workers is None else o.workers
    loader = eval_loader(
        images.root, images.samples, states[0][1]["preprocess"], o.batch_size, num_workers=workers,
        pin_memory=dev.type == "cuda",
    )  # fmt: skip
    runs = []
    for path, state in states:
        model = build_from_checkpoint(state, use_ema=o.use_ema, source=str(path)).to(dev)
        runs.append(predict_probs(model, loader, dev, tta=o.tta, progress=o.progress))
    probs = torch.stack([p for p, _, _ in runs]).mean(0)
    targets = runs[0][1]
    loss = float(torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), targets))
    if len(targets) != len(images.samples):  # unreadable images were left out: find which
        readable = [s for s in images.samples if check_image(images.root / s.path) is None]
        images = EvalSet(images.root, readable, images.split, images.source)
        if len(readable) != len(targets):
            raise SemodelError(f"images under {images.root} changed while they were evaluated; run again")
    return probs, targets, loss if len(states) > 1 else runs[0][2], images


def calibrated(states: list[tuple[Path, dict[str, Any]]], probs: torch.Tensor) -> torch.Tensor:
    """``probs`` with the temperature fitted on the validation split (one checkpoint only)."""
    path, state = states[0]
    if len(states) > 1:
        raise SemodelError(
            "--calibrated: the folds of a cross-validation have a temperature each; leave it out"
        )
    temperature = (state.get("calibration") or {}).get("temperature")
    if temperature is None:
        raise SemodelError(
            f"--calibrated: {path} has no fitted temperature (checkpoints of semodel 0.1 before the run "
            "report have none; train again, or leave --calibrated out)"
        )
    return apply_temperature(probs, temperature)


# ----------------------------------------------------------------------------- report


def format_report(report: dict[str, Any]) -> str:
    """The text ``semodel eval`` prints: where from, the metrics with intervals, per class, confusion."""
    m, d, classes = report["metrics"], report["data"], report["classes"]
    epoch = f", epoch {report['epoch']}" if report.get("epoch") is not None else ""
    skipped = d["listed"] - d["evaluated"]
    weights = report.get("weights_note") or report["weights"]
    ensemble = report.get("ensemble")
    lines = [
        f"checkpoint  {report['checkpoint']}  ({report['model']}{epoch})",
        *([f"ensemble    mean probabilities of {len(ensemble)} folds' best.pt"] if ensemble else []),
        f"weights     {weights}" + ("  calibrated (temperature)" if report.get("calibrated") else ""),
        f"data        {d['root']}",
        f"images      {d['source']}: {d['evaluated']} images"
        + (f" ({skipped} unreadable, skipped)" if skipped else ""),
        f"device      {report['device']}  tta: {report['tta'] or 'off'}",
        "",
    ]
    analysis = report.get("analysis")
    lines += summary_lines(m, analysis, len(classes)) + [""]
    if analysis:
        lines += analysis_lines(analysis)
    lines += class_lines(m, classes) + [""]
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    cm = [["true \\ predicted", *classes]] + [
        [name, *map(str, row)] for name, row in zip(classes, m["confusion_matrix"], strict=True)
    ]
    lines += align(cm)
    return "\n".join(lines) + "\n"


def interval(estimate: dict[str, Any] | None) -> str:
    if not estimate or estimate.get("low") is None:
        return ""
    return f"{estimate['low']:.4f} - {estimate['high']:.4f}"


def summary_lines(m: dict[str, Any], analysis: dict[str, Any] | None, classes: int) -> list[str]:
    intervals = (analysis or {}).get("intervals", {})
    auc_name = "ROC-AUC" if classes == 2 else "ROC-AUC (one-vs-rest, macro)"
    auc = f"{m['auc']:.4f}" if m.get("auc") is not None else "n/a (a class has no image)"
    rows = [
        ["accuracy", f"{m['acc']:.4f}", interval(intervals.get("acc"))],
        ["balanced accuracy", f"{m['balanced_acc']:.4f}", interval(intervals.get("balanced_acc"))],
        ["macro-F1", f"{m['f1_macro']:.4f}", interval(intervals.get("f1_macro"))],
        [auc_name, auc, interval(intervals.get("auc"))],
    ]
    rows += [
        [f"top-{k} accuracy", f"{m[f'top{k}_acc']:.4f}", ""] for k in range(2, classes) if f"top{k}_acc" in m
    ]
    rows.append(["loss (cross-entropy)", f"{m['loss']:.4f}", ""])
    if not any(r[2] for r in rows):
        return align(rows)
    unit = "patients" if analysis["resampled"] == "groups" else "images"
    rows.insert(0, ["metric", "value", "95% interval"])
    note = f"(intervals: percentile bootstrap, {analysis['resamples']} resamples of the {unit})"
    return align(rows, right=lambda i: i == 1) + [note]


def analysis_lines(analysis: dict[str, Any]) -> list[str]:
    """Per-patient metrics, the binary operating points and calibration, as tables."""
    lines = []
    by_group = analysis.get("by_group")
    if by_group:
        intervals = "95% interval" if analysis["resamples"] else ""
        rows = [["per patient", f"value ({by_group['groups']} groups, probabilities averaged)", intervals]]
        rows += [
            [title, metric(e["value"]), interval(e)]
            for key, title in METRICS[:4]
            if (e := by_group["intervals"].get(key))
        ]
        lines += align(rows) + [""]
    points = analysis.get("operating_points")
    if points:
        header = ["two classes", "at 0.5"] + (
            [f"at {points['threshold']:.4f} (chosen on val)"] if "val" in points["points"] else []
        )
        rows = [header]
        for key, title in METRICS[4:]:
            rows.append(
                [
                    title,
                    *(
                        f"{metric(p[key]['value'])} {interval(p[key])}".strip()
                        for p in points["points"].values()
                    ),
                ]
            )
        lines += align(rows) + [""]
    cal = analysis.get("calibration", {})
    text = f"calibration: expected calibration error {cal.get('ece', float('nan')):.4f}"
    if cal.get("temperature") is not None:
        fitted = f"the temperature {cal['temperature']:.3f} fitted on val (--calibrated)"
        text += f"; {cal['ece_calibrated']:.4f} with {fitted}"
    return lines + [text, ""]


def class_lines(m: dict[str, Any], classes: list[str]) -> list[str]:
    rows = [["class", "precision", "recall", "f1-score", "support"]]
    for name in classes:
        pc = m["per_class"][name]
        rows.append(
            [name, f"{pc['precision']:.4f}", f"{pc['recall']:.4f}", f"{pc['f1']:.4f}", str(pc["support"])]
        )
    for avg in ("macro", "weighted"):
        values = [f"{m[f'{k}_{avg}']:.4f}" for k in ("precision", "recall", "f1")]
        rows.append([f"{avg} avg", *values, str(m["n"])])
    return align(rows)


# ----------------------------------------------------------------------------- command


@dataclass
class EvalOutputs:
    """What ``semodel eval`` writes besides the printed report."""

    output: Path | None = None  # the report as JSON
    plot: Path | None = None  # a folder for confusion_matrix.png, roc.png, reliability.png
    predictions: Path | None = None  # per-image CSV
    worst: int | None = None  # worst.png: this many most confidently wrong images, with Grad-CAM


def check_outputs(checkpoint: Path, out: EvalOutputs) -> None:
    """Refuse bad output options before anything is computed (no command writes over its input)."""
    for option, path in (("--output", out.output), ("--predictions", out.predictions)):
        if path is not None and path.is_dir():
            raise SemodelError(f"{option} {path} is a folder; give a file name")
        if path is not None:
            refuse_overwrite(path, option, {"the checkpoint": Path(checkpoint)})
    if out.plot is not None and out.plot.exists() and not out.plot.is_dir():
        raise SemodelError(f"--plot {out.plot} is a file; give a folder for the PNG files")
    if out.worst is not None and out.worst < 1:
        raise SemodelError(f"--worst {out.worst}: must be at least 1 (the number of images shown)")


def eval_from_cli(
    checkpoint: Path, data: Path | None, options: EvalOptions, outputs: EvalOutputs
) -> dict[str, Any]:
    check_outputs(checkpoint, outputs)
    options.progress = sys.stderr.isatty()
    result = evaluate_checkpoint(checkpoint, data, options)
    sys.stdout.write(format_report(result.report))
    written = []
    if outputs.output is not None:
        written.append(write_json(outputs.output, result.report))
    if outputs.predictions is not None:
        rows = prediction_rows(result.images.samples, result.report["classes"], result.probs, result.groups)
        written.append(write_predictions(outputs.predictions, rows))
    if outputs.plot is not None or outputs.worst is not None:
        written += write_figures(result, outputs)
    if written:
        say(f"wrote {', '.join(str(p) for p in written)}")
    return result.report


def write_figures(result: EvalResult, outputs: EvalOutputs) -> list[Path]:
    """``--plot``'s figures and ``--worst``'s grid, in the ``--plot`` folder (else here)."""
    from semodel.plots import save_eval_plots

    folder = outputs.plot or Path(".")
    written = []
    if outputs.plot is not None:
        matrix, classes = result.report["metrics"]["confusion_matrix"], result.report["classes"]
        calibration = result.states[0].get("calibration") if len(result.states) == 1 else None
        written += save_eval_plots(folder, matrix, result.probs, result.targets, classes, calibration)
    if outputs.worst is not None:
        folder.mkdir(parents=True, exist_ok=True)
        written.append(worst_figure(folder / "worst.png", result, outputs.worst))
    return written


def worst_figure(path: Path, result: EvalResult, n: int) -> Path:
    """The ``n`` most confidently wrong images with the Grad-CAM of their prediction."""
    from semodel.analysis import most_confidently_wrong
    from semodel.gradcam import explained_images
    from semodel.plots import image_grid_figure, save_figure

    classes, images = result.report["classes"], result.images
    rows = most_confidently_wrong(result.probs, result.targets, n)
    items = [
        {
            "path": images.root / images.samples[i].path,
            "true": classes[int(result.targets[i])],
            "predicted": classes[int(result.probs[i].argmax())],
            "prob": float(result.probs[i].max()),
        }
        for i in rows
    ]
    state = result.states[0]
    model = build_from_checkpoint(state, use_ema=result.report["weights"] == "ema").cpu()
    cells = explained_images(model, state["preprocess"], items, torch.device("cpu"))
    fold = " (Grad-CAM of fold 1's model)" if len(result.states) > 1 else ""
    title = f"the {len(cells)} most confidently wrong of {len(result.targets)} images{fold}"
    return save_figure(image_grid_figure(cells, title=title), path)
