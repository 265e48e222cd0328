"""``semodel eval``: metrics of a checkpoint on its run's held-out split or on any ImageFolder.

By default the images are the run's own test split (else val), read from ``split.csv`` beside
the checkpoint, under the data root stored in the checkpoint's config. ``--data DIR`` evaluates
another ImageFolder instead; its class names must be the checkpoint's.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semodel.checkpoint import build_from_checkpoint
from semodel.data import Sample, read_split_csv, report_bad_files, scan_dataset
from semodel.errors import SemodelError

SPLIT_CHOICES = ("auto", "train", "val", "test", "all")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class EvalSet:
    """The images to evaluate: paths relative to ``root``, labels in the checkpoint's class order."""

    root: Path
    samples: list[Sample]
    split: str  # test, val, train or all
    source: str  # where the list came from, for the report


@dataclass
class EvalResult:
    report: dict[str, Any]  # what --output writes
    probs: torch.Tensor  # N x C
    targets: torch.Tensor  # N


# ----------------------------------------------------------------------------- which images


def pick_split(samples: list[Sample], split: str, where: str) -> tuple[list[Sample], str]:
    """``auto``: test if there is one, else val; ``all``: every sample."""
    if split not in SPLIT_CHOICES:
        raise SemodelError(f"--split {split!r}: use one of {', '.join(SPLIT_CHOICES)}")
    if split == "all":
        return list(samples), "all"
    name = split
    if split == "auto":
        name = "test" if any(s.split == "test" for s in samples) else "val"
    chosen = [s for s in samples if s.split == name]
    if not chosen:
        raise SemodelError(f"{where}: has no {name} images")
    return chosen, name


def locate_data_root(root: str, run_dir: str | None, checkpoint: Path) -> Path | None:
    """The run's data root: as stored (absolute, or relative to the current folder), or relative
    to the folder training ran in (recovered from the stored ``run_dir`` and where the checkpoint is).
    """
    stored = Path(root).expanduser()
    candidates = [stored]
    if not stored.is_absolute() and run_dir and not Path(run_dir).is_absolute():
        here = checkpoint.resolve().parent.parts
        run_parts = Path(run_dir).parts
        if len(here) > len(run_parts) and here[-len(run_parts) :] == run_parts:
            candidates.append(Path(*here[: -len(run_parts)]) / stored)
    return next((c for c in candidates if c.is_dir()), None)


def run_eval_set(state: dict[str, Any], checkpoint: Path, split: str) -> EvalSet:
    """The run's own split, from ``split.csv`` beside the checkpoint and the stored data root."""
    classes = list(state["classes"])
    hint = f"pass --data DIR (an ImageFolder with the classes {', '.join(classes)})"
    split_file = checkpoint.parent / "split.csv"
    if not split_file.is_file():
        raise SemodelError(
            f"{split_file} not found (eval reads the run's split beside the checkpoint); {hint}"
        )
    stored_root = str(state["config"].get("data", {}).get("root", ""))
    root = locate_data_root(stored_root, state.get("run_dir"), checkpoint) if stored_root else None
    if root is None:
        raise SemodelError(
            f"the run's data folder {stored_root or '?'} (from the checkpoint) is not found; {hint}"
        )
    samples, name = pick_split(read_split_csv(split_file, root, classes), split, str(split_file))
    gone = [s for s in samples if not (root / s.path).is_file()]
    if len(gone) == len(samples):
        raise SemodelError(f"none of the {len(samples)} {name} files of {split_file} is in {root}; {hint}")
    if gone:
        _stderr(
            f"warning: {len(gone)} of {len(samples)} {name} file(s) of {split_file} are gone from {root} "
            f"(first: {gone[0].path}); they are skipped"
        )
        samples = [s for s in samples if (root / s.path).is_file()]
    return EvalSet(root, samples, name, f"{name} split of {split_file}")


def folder_eval_set(folder: Path, classes: list[str], split: str) -> EvalSet:
    """An ImageFolder (plain, or with train/val/test folders) whose class names are the checkpoint's."""
    data = scan_dataset(folder)
    if sorted(data.classes) != sorted(classes):
        missing = sorted(set(classes) - set(data.classes))
        extra = sorted(set(data.classes) - set(classes))
        raise SemodelError(
            f"{folder}: class folders do not match the checkpoint's classes: checkpoint has "
            f"[{', '.join(classes)}], folder has [{', '.join(data.classes)}] "
            f"(missing: {', '.join(missing) or '-'}; not in checkpoint: {', '.join(extra) or '-'})"
        )
    report_bad_files(data, _stderr)
    index = {c: i for i, c in enumerate(classes)}
    samples = [Sample(s.path, index[data.classes[s.label]], s.split) for s in data.samples]
    if any(s.split for s in samples):
        samples, name = pick_split(samples, split, str(folder))
        return EvalSet(data.root, samples, name, f"{name}/ of {folder}")
    if split not in ("auto", "all"):
        raise SemodelError(f"--split {split}: {folder} has no train/val/test folders; leave --split out")
    return EvalSet(data.root, samples, "all", f"all images of {folder}")


# ----------------------------------------------------------------------------- inference


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in ``dtype`` on ``device``; a no-op for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    loader,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Softmax probabilities (N x C), targets (N) and the mean cross-entropy over ``loader``.

    ``dtype`` runs the model under autocast; ``tta`` averages the logits with the hflip's.
    """
    model.eval()
    probs, targets, loss_sum = [], [], 0.0
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc="eval", unit="batch", file=sys.stderr)
    for images, labels in batches:
        if images.numel() == 0:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device)
        with autocast(device, dtype):
            logits = model(images).float()
            if tta:
                logits = (logits + model(torch.flip(images, dims=[3])).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        probs.append(logits.softmax(1).cpu())
        targets.append(labels.cpu())
    if not probs:
        raise SemodelError("no readable image to evaluate")
    targets_t = torch.cat(targets)
    return torch.cat(probs), targets_t, loss_sum / len(targets_t)


def evaluate_checkpoint(
    checkpoint: Path,
    data: Path | None = None,
    split: str = "auto",
    device: str = "auto",
    batch_size: int = 64,
    use_ema: bool = False,
    tta: bool = False,
    workers: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] = _stderr,
    images: EvalSet | None = None,
) -> EvalResult:
    """Metrics of ``checkpoint`` on the run's own split, on the ImageFolder ``data``, or on
    ``images`` (a list chosen by the caller: ``semodel cv`` tests each fold on its own images)."""
    from torch.utils.data import DataLoader

    from semodel.data import ImageList, collate_skip_bad, default_workers, eval_transform
    from semodel.metrics import classification_metrics
    from semodel.predict import open_checkpoint, resolve_device

    if batch_size < 1:
        raise SemodelError(f"--batch-size {batch_size}: must be at least 1")
    checkpoint = Path(checkpoint)
    state = open_checkpoint(checkpoint)
    classes = list(state["classes"])
    dev = resolve_device(device)
    model = build_from_checkpoint(state, use_ema=use_ema, source=str(checkpoint)).to(dev)
    if state.get("ema") and not use_ema:
        log("note: this checkpoint also has EMA weights (training validated those); --ema evaluates them")
    if images is None:
        images = (
            folder_eval_set(Path(data), classes, split)
            if data is not None
            else run_eval_set(state, checkpoint, split)
        )
    workers = default_workers(dev.type) if workers is None else workers
    loader = DataLoader(
        ImageList(images.root, images.samples, eval_transform(state["preprocess"])),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skip_bad,
        pin_memory=dev.type == "cuda",
    )
    probs, targets, loss = predict_probs(model, loader, dev, tta=tta, progress=progress)
    metrics = classification_metrics(probs, targets, classes)
    metrics["loss"] = loss
    report = {
        "checkpoint": str(checkpoint),
        "model": state["config"]["model"]["name"],
        "epoch": state.get("epoch"),
        "weights": "ema" if use_ema else "model",
        "tta": "hflip" if tta else None,
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


def _table(rows: list[list[str]], left: int = 1) -> list[str]:
    """Align columns: the first ``left`` columns to the left, the others to the right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def format_report(report: dict[str, Any]) -> str:
    m, d, classes = report["metrics"], report["data"], report["classes"]
    epoch = f", epoch {report['epoch']}" if report.get("epoch") is not None else ""
    skipped = d["listed"] - d["evaluated"]
    lines = [
        f"checkpoint  {report['checkpoint']}  ({report['model']}{epoch}, weights: {report['weights']})",
        f"data        {d['source']}: {d['evaluated']} images"
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
    lines += _table(summary) + [""]

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
    lines += _table(rows) + [""]

    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    cm = [["true \\ predicted", *classes]] + [
        [name, *map(str, row)] for name, row in zip(classes, m["confusion_matrix"], strict=True)
    ]
    lines += _table(cm)
    return "\n".join(lines) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a half-written file never replaces a good one."""
    from semodel.checkpoint import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def eval_from_cli(
    checkpoint: Path,
    data: Path | None,
    split: str,
    output: Path | None,
    plot: Path | None,
    use_ema: bool,
    tta: bool,
    device: str,
    batch_size: int,
    workers: int | None,
) -> dict[str, Any]:
    if output is not None and output.is_dir():
        raise SemodelError(
            f"--output {output} is a folder; give a file name such as {output / 'metrics.json'}"
        )
    if plot is not None and plot.exists() and not plot.is_dir():
        raise SemodelError(f"--plot {plot} is a file; give a folder for the PNG files")
    result = evaluate_checkpoint(
        checkpoint, data, split, device, batch_size, use_ema, tta, workers, progress=sys.stderr.isatty()
    )
    sys.stdout.write(format_report(result.report))
    if output is not None:
        write_json(output, result.report)
        _stderr(f"wrote {output}")
    if plot is not None:
        from semodel.plots import save_eval_plots

        written = save_eval_plots(
            plot, result.report["metrics"], result.probs, result.targets, result.report["classes"]
        )
        _stderr(f"wrote {', '.join(str(p) for p in written)}")
    return result.report
