"""``semodel report RUN_DIR``: a run's results as files a colleague can read offline.

Written into the run folder (by ``semodel train`` at the end of a run, and again by
``semodel report`` for any finished run, old ones included):

    results.csv            one row per epoch: train/val loss and metrics, lr, images/s, epoch time
    curves.png             loss, accuracy and balanced accuracy, learning rate over the epochs
    test_predictions.csv   one row per test image: path, group, true, predicted, a probability per class
    confusion_matrix.png, roc.png, reliability.png, worst.png (the most confidently wrong test
                           images with the Grad-CAM of their prediction)
    report.html            all of it in one self-contained page: figures embedded, no network, no script

Every figure is a test-split figure of the best weights, with 95% bootstrap intervals (patients
resampled where ``data.split.group_by`` names them); ``semodel.analysis`` computes them.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from semodel._version import __version__
from semodel.analysis import METRICS, analyse, groups_of, prediction_rows, read_predictions, write_predictions
from semodel.checkpoint import load_checkpoint
from semodel.errors import SemodelError
from semodel.evalsets import EvalSet
from semodel.files import read_json, write_text_atomic
from semodel.runlog import say
from semodel.timing import LABELS, PARTS

FIGURES = ("curves.png", "confusion_matrix.png", "roc.png", "reliability.png", "worst.png")


@dataclass
class ReportOptions:
    resamples: int = 1000  # bootstrap resamples of the intervals (0: none)
    worst: int = 8  # most confidently wrong images shown
    device: str = "auto"  # for a test split that must be predicted again (runs older than the report)
    seed: int = 0


@dataclass
class Results:
    """What a report shows of one set of test predictions."""

    images: EvalSet
    probs: torch.Tensor
    targets: torch.Tensor
    groups: list[str] | None
    metrics: dict[str, Any]  # classification_metrics
    analysis: dict[str, Any]  # semodel.analysis.analyse


# ----------------------------------------------------------------------------- one run


def report_after_training(run_dir: Path, log: Callable[[str], None] = say) -> Path | None:
    """The report of a run that just finished, unless its config says ``log.report: false``."""
    state = load_checkpoint(Path(run_dir) / "best.pt")
    if not state["config"]["log"].get("report", True):
        return None
    return build_report(run_dir, log=log)


def build_report(
    run_dir: Path, options: ReportOptions | None = None, log: Callable[[str], None] = say
) -> Path:
    """Write the run's report files (see the module docstring); returns report.html."""
    o = options or ReportOptions()
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / "best.pt")
    summary = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    history = summary.get("history") or state.get("history") or []
    write_results_csv(run_dir / "results.csv", history)
    results = test_results(run_dir, state, o)
    figures = write_figures(run_dir, state, results, history, o)
    page = run_page(run_dir, state, summary, results, figures)
    path = write_text_atomic(run_dir / "report.html", page)
    log(f"report: {path} (and results.csv, test_predictions.csv, {', '.join(p.name for p in figures)})")
    return path


def test_results(run_dir: Path, state: dict[str, Any], o: ReportOptions) -> Results:
    """The best weights' test predictions: from test_predictions.csv, or predicted now (old runs)."""
    from semodel.evalsets import locate_data_root
    from semodel.metrics import classification_metrics

    classes = list(state["classes"])
    table = run_dir / "test_predictions.csv"
    if table.is_file():
        samples, probs, _ = read_predictions(table, classes)
        root = locate_data_root(state, run_dir / "best.pt")
        if root is None:
            raise SemodelError(
                f"the data folder of {run_dir} is not found (the report shows its test images)"
            )
        images = EvalSet(root, samples, "test", f"test split of {run_dir / 'split.csv'}")
        targets = torch.tensor([s.label for s in samples])
    else:
        images, probs, targets = predict_test_split(run_dir, state, o)
    groups = groups_of(images.samples, state["config"]["data"]["split"].get("group_by"))
    if not table.is_file():
        write_predictions(table, prediction_rows(images.samples, classes, probs, groups))
    metrics = classification_metrics(probs, targets, classes)
    analysis = analyse(probs, targets, classes, groups, state.get("calibration"), o.resamples, o.seed)
    return Results(images, probs, targets, groups, metrics, analysis)


def predict_test_split(run_dir: Path, state: dict[str, Any], o: ReportOptions):
    from semodel.evaluate import EvalOptions, evaluate_checkpoint

    split = run_dir / "split.csv"
    if split.is_file() and not any(
        row.get("split") == "test" for row in csv.DictReader(split.open(newline=""))
    ):
        raise SemodelError(
            f"{run_dir} has no test split (data.split.test was 0): the report's figures are test figures; "
            "train with data.split.test > 0, or evaluate other images with semodel eval --data"
        )
    options = EvalOptions(split="test", device=o.device, resamples=0, workers=0)
    result = evaluate_checkpoint(run_dir / "best.pt", options=options, log=lambda _: None)
    return result.images, result.probs, result.targets


def write_results_csv(path: Path, history: list[dict[str, Any]]) -> Path:
    """One row per epoch of the run's history (empty cells where an older run did not record a value)."""
    columns = [
        ("train_loss", "train", "loss"), ("train_acc", "train", "acc"), ("val_loss", "val", "loss"),
        ("val_acc", "val", "acc"), ("val_balanced_acc", "val", "balanced_acc"),
        ("val_f1_macro", "val", "f1_macro"),
        ("val_auc", "val", "auc"), ("lr", "train", "lr"), ("images_per_s", "train", "images_per_s"),
        ("epoch_time_s", "train", "epoch_time_s"),
    ]  # fmt: skip
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["epoch", *(name for name, _, _ in columns)])
    for entry in history:
        values = [entry.get(part, {}).get(key) for _, part, key in columns]
        writer.writerow([entry["epoch"], *("" if v is None else f"{v:.6g}" for v in values)])
    return write_text_atomic(path, text.getvalue())


def write_figures(
    run_dir: Path, state: dict, results: Results, history: list, o: ReportOptions
) -> list[Path]:
    from semodel.plots import curves_figure, save_eval_plots, save_figure

    best_epoch = (state.get("best") or {}).get("epoch")
    written = [save_figure(curves_figure(history, best_epoch), run_dir / "curves.png")]
    matrix, classes = results.metrics["confusion_matrix"], list(state["classes"])
    written += save_eval_plots(
        run_dir, matrix, results.probs, results.targets, classes, state.get("calibration")
    )
    written.append(worst_images(run_dir / "worst.png", state, results, o.worst))
    return written


def worst_images(path: Path, state: dict[str, Any], results: Results, n: int) -> Path:
    """The ``n`` most confidently wrong test images with the Grad-CAM of their prediction."""
    from semodel.analysis import most_confidently_wrong
    from semodel.checkpoint import build_from_checkpoint
    from semodel.gradcam import explained_images
    from semodel.plots import image_grid_figure, save_figure

    classes, images = list(state["classes"]), results.images
    items = [
        {
            "path": images.root / images.samples[i].path,
            "true": classes[int(results.targets[i])],
            "predicted": classes[int(results.probs[i].argmax())],
            "prob": float(results.probs[i].max()),
        }
        for i in most_confidently_wrong(results.probs, results.targets, n)
    ]
    cells = explained_images(
        build_from_checkpoint(state).cpu(), state["preprocess"], items, torch.device("cpu")
    )
    title = f"the {len(cells)} most confidently wrong of {len(results.targets)} test images"
    return save_figure(image_grid_figure(cells, title=title), path)


# ----------------------------------------------------------------------------- the page


def run_page(run_dir: Path, state: dict, summary: dict, results: Results, figures: list[Path]) -> str:
    """report.html of one run."""
    cfg = state["config"]
    title = f"{run_dir.name}: {cfg['model']['name']}, {len(state['classes'])} classes"
    sections = [
        section("Test results of the best weights", metrics_html(results.analysis, results.metrics)),
        section("Data", data_html(run_dir, state, summary, results)),
        figure_section(
            "Training curves", run_dir / "curves.png", "loss, accuracy and learning rate per epoch"
        ),
        section("Per class", per_class_html(results.metrics, list(state["classes"]))),
        figure_section("Confusion matrix", run_dir / "confusion_matrix.png", "rows: true class"),
        figure_section("ROC", run_dir / "roc.png", "one curve per class; AUC in the legend"),
        figure_section("Calibration", run_dir / "reliability.png", calibration_text(results.analysis)),
        figure_section(
            "Most confidently wrong test images", run_dir / "worst.png", "Grad-CAM of the prediction"
        ),
    ]
    if summary.get("time_budget"):  # runs before the time budget have none
        sections.append(section("Where the training time went", time_budget_html(summary["time_budget"])))
    sections.append(section("Config", f"<pre>{html.escape(config_yaml(cfg))}</pre>"))
    footer = f"made by semodel {__version__}: <code>semodel report {html.escape(str(run_dir))}</code>"
    return page(title, sections, footer)


def page(title: str, sections: list[str], footer: str) -> str:
    style = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f2f2f2}"
        "img{max-width:100%;height:auto;border:1px solid #eee}pre{background:#f7f7f7;padding:1em;"
        "overflow-x:auto}.note{color:#666;font-size:.9em}h2{border-bottom:1px solid #ddd}"
    )
    body = "\n".join(sections)
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n"
        f"<p class='note'>{footer}</p></body></html>\n"
    )


def section(title: str, content: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{content}"


def figure_section(title: str, path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    image = f"<img src='data:image/png;base64,{data}' alt='{html.escape(path.name)}'>"
    return section(
        title, f"<figure>{image}<figcaption class='note'>{html.escape(caption)}</figcaption></figure>"
    )


def table_html(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def estimate_text(e: dict[str, Any] | None) -> tuple[str, str]:
    if not e or e.get("value") is None:
        return "n/a", ""
    return f"{e['value']:.3f}", (f"{e['low']:.3f} - {e['high']:.3f}" if e.get("low") is not None else "")


def estimate_cell(e: dict[str, Any] | None) -> str:
    """``0.812 (0.750 - 0.870)``: a value with its interval in one cell."""
    value, interval = estimate_text(e)
    return f"{value} ({interval})" if interval else value


def metrics_html(analysis: dict[str, Any], metrics: dict[str, Any]) -> str:
    unit = "patients" if analysis["resampled"] == "groups" else "images"
    rows = [["metric", "value", "95% interval"]]
    rows += [
        [title, *estimate_text(analysis["intervals"].get(key))]
        for key, title in METRICS
        if key in analysis["intervals"]
    ]
    parts = [
        f"<p>{metrics['n']} test images. Intervals: percentile bootstrap, {analysis['resamples']} "
        f"resamples of the {unit}.</p>",
        table_html(rows),
    ]
    if analysis.get("by_group"):
        g = analysis["by_group"]
        rows = [["per patient", "value", "95% interval"]]
        rows += [
            [title, *estimate_text(g["intervals"].get(key))]
            for key, title in METRICS
            if key in g["intervals"]
        ]
        parts += [
            f"<p>Per patient: {g['groups']} groups, each group's probabilities averaged.</p>",
            table_html(rows),
        ]
    if analysis.get("operating_points"):
        parts.append(operating_points_html(analysis["operating_points"]))
    return "\n".join(parts)


def operating_points_html(points: dict[str, Any]) -> str:
    def name(key: str) -> str:
        return "at p = 0.5" if key == "0.5" else f"at {points['threshold']:.4f} (chosen on val)"

    rows = [["operating point", *(name(k) for k in points["points"])]]
    for key, title in METRICS[4:]:
        rows.append([title, *(estimate_cell(p.get(key)) for p in points["points"].values())])
    return "<p>Two classes, the second one positive:</p>" + table_html(rows)


def per_class_html(metrics: dict[str, Any], classes: list[str]) -> str:
    rows = [["class", "precision", "recall", "F1", "images"]]
    for name in classes:
        pc = metrics["per_class"][name]
        rows.append(
            [name, f"{pc['precision']:.3f}", f"{pc['recall']:.3f}", f"{pc['f1']:.3f}", str(pc["support"])]
        )
    return table_html(rows)


def calibration_text(analysis: dict[str, Any]) -> str:
    cal = analysis["calibration"]
    text = f"expected calibration error {cal['ece']:.3f}"
    if cal.get("temperature") is not None:
        scaling = f"temperature scaling (T = {cal['temperature']:.3f}, fitted on val)"
        text += f"; {cal['ece_calibrated']:.3f} after {scaling}"
    return text


def data_html(run_dir: Path, state: dict, summary: dict, results: Results) -> str:
    from semodel.data import read_split_csv

    classes = list(state["classes"])
    rows = [["split", *classes, "all"]]
    split = run_dir / "split.csv"
    samples = read_split_csv(split, classes) if split.is_file() else []
    for name in ("train", "val", "test"):
        counts = [sum(1 for s in samples if s.split == name and s.label == c) for c in range(len(classes))]
        rows.append([name, *map(str, counts), str(sum(counts))])
    skipped = (summary.get("data") or {}).get("skipped", [])
    listed = "".join(f"<li><code>{html.escape(p)}</code>: {html.escape(r)}</li>" for p, r in skipped[:50])
    parts = [f"<p>Data folder <code>{html.escape(str(results.images.root))}</code>.</p>", table_html(rows)]
    parts.append(
        f"<p>Skipped files: {len(skipped)}</p><ul>{listed}</ul>" if skipped else "<p>No file was skipped.</p>"
    )
    return "\n".join(parts)


def time_budget_html(budget: dict[str, float]) -> str:
    """The run's time budget (metrics.json ``time_budget``, see semodel.timing): each part's
    seconds and share of the wall time, largest first."""
    wall = max(budget.get("wall", 0.0), 1e-9)
    parts = sorted((p for p in (*PARTS, "other") if p in budget), key=lambda p: -budget[p])
    rows = [["part", "seconds", "share of the wall time"]]
    rows += [[LABELS.get(p, p), f"{budget[p]:.1f}", f"{budget[p] / wall:.1%}"] for p in parts]
    rows.append(["wall time", f"{wall:.1f}", "100%"])
    note = (
        f"<p>Checkpoint files were written on a background thread for "
        f"{budget.get('checkpoint_background', 0.0):.1f}s while training went on; "
        "<code>checkpoint</code> is what the training loop waited for. The parts are described in "
        "the performance page of the docs (the time budget).</p>"
    )
    return table_html(rows) + "\n" + note


def config_yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------- cross-validation


def cv_page(
    cv_dir: Path, config: dict, summary: dict, pooled: Results, per_fold: list[dict[str, Any]]
) -> str:
    """report.html of a cross-validation (``semodel.cv.cv_report`` computes what it shows)."""
    keys = [(k, t) for k, t in METRICS[:4]]
    rows = [["fold", "test images", *(t for _, t in keys), "weights", "epoch"]]
    for fold, analysis in zip(summary["per_fold"], per_fold, strict=True):
        cells = [estimate_cell(analysis["intervals"].get(k)) for k, _ in keys]
        label = Path(fold["checkpoint"]).name + (" ema" if fold["ema"] else "")
        rows.append([str(fold["fold"]), str(fold["n"]), *cells, label, str(fold["epoch"])])
    spread = [
        f"{summary['mean'][k]:.3f} +- {summary['std'][k]:.3f}" if summary["std"].get(k) is not None else "n/a"
        for k, _ in keys
    ]
    rows.append(["mean +- std", str(summary["n"]), *spread, "", ""])
    folds = (
        f"<p>{summary['folds']} folds of <code>{html.escape(str(summary['data']))}</code>, grouped by "
        f"<code>{html.escape(str(summary.get('group_by')))}</code>. Per fold: the value and its 95% "
        "bootstrap interval; std: the sample standard deviation over the folds (n - 1).</p>"
        + table_html(rows)
    )
    sections = [
        section("Folds", folds),
        section("Pooled out-of-fold predictions", metrics_html(pooled.analysis, pooled.metrics)),
        section("Per class (pooled)", per_class_html(pooled.metrics, list(pooled.metrics["per_class"]))),
        figure_section("Confusion matrix (pooled)", cv_dir / "confusion_matrix.png", "rows: true class"),
        figure_section("ROC (pooled)", cv_dir / "roc.png", "one curve per class; AUC in the legend"),
        figure_section("Calibration (pooled)", cv_dir / "reliability.png", calibration_text(pooled.analysis)),
        section("Config", f"<pre>{html.escape(config_yaml(config))}</pre>"),
    ]
    footer = f"made by semodel {__version__}: <code>semodel report {html.escape(str(cv_dir))}</code>"
    return page(
        f"{cv_dir.name}: {summary['folds']}-fold cross-validation, {config['model']['name']}",
        sections,
        footer,
    )
