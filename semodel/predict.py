"""``semodel predict``: top-k classes for image files, folders and glob patterns.

Cold start matters here (one image, on a CPU), so this module imports only torch, PIL and the
model code: no torchvision (its import pulls in torch._dynamo, about 2 s), no torchmetrics, no
matplotlib (only with ``--cam``), no pydantic. Images are prepared by ``semodel.preprocess``, which
reproduces the checkpoint's evaluation transform with plain torch calls.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from semodel.checkpoint import build_from_checkpoint, load_checkpoint
from semodel.data import IMAGE_EXTENSIONS, read_image
from semodel.errors import SemodelError
from semodel.preprocess import preprocess_image
from semodel.runlog import say
from semodel.runtime import resolve_device
from semodel.tables import align

FORMATS = ("table", "json", "csv")
GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------- the model


@dataclass
class Classifier:
    """A checkpoint's model ready to predict: in eval mode on ``device``, with its classes and
    preprocessing."""

    model: torch.nn.Module
    classes: list[str]
    preprocess: dict[str, Any]
    device: torch.device

    @classmethod
    def load(cls, checkpoint: Path, device: str = "auto", use_ema: bool = False) -> Classifier:
        state = load_checkpoint(checkpoint)
        dev = resolve_device(device)
        model = build_from_checkpoint(state, use_ema=use_ema, source=str(checkpoint)).to(dev)
        return cls(model, list(state["classes"]), state["preprocess"], dev)


def newest_best_checkpoint(runs: Path = Path("runs")) -> Path:
    """The most recently written ``best.pt`` under ``runs`` (what predict uses without --checkpoint)."""
    found = [p for p in runs.glob("**/best.pt") if p.is_file()] if runs.is_dir() else []
    if not found:
        raise SemodelError(
            f"no --checkpoint given and no best.pt found under {runs}/; pass --checkpoint FILE"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


# ----------------------------------------------------------------------------- inputs


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def images_in(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden files and other extensions skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / n for n in sorted(filenames) if is_image_name(Path(n))]
    return found


def expand_pattern(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, except that ``**`` does not enter linked folders.

    glob's ``**`` follows symlinks to folders, and a link to a folder above it (a loop) makes
    it run for ever; pathlib's ``**`` does not follow them.
    """
    parts = Path(pattern).parts
    if "**" not in parts:
        return glob.glob(pattern)
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    base = Path(*parts[:fixed]) if fixed else Path()
    found = []
    for match in base.glob(str(Path(*parts[fixed:]))):
        if not any(part.startswith(".") for part in match.relative_to(base).parts):  # as glob: no hidden
            found.append(str(match))
    return found


def collect_inputs(inputs: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders and glob patterns into image paths (input order, no duplicates).

    Returns the paths and the (input, reason) pairs of inputs that name no image: a missing
    file, an empty folder, a pattern that matches nothing. A named file is always tried, whatever
    its extension; folders and patterns contribute files with an image extension only.
    """
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = images_in(p)
            if not found:
                problems.append(
                    (item, f"no image files in this folder ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
                )
        elif p.exists() or not GLOB_CHARS & set(item):
            found = [p]  # a missing file is reported when it is read, in input order
        else:
            found = []
            for match in sorted(expand_pattern(os.path.expanduser(item))):
                m = Path(match)
                found += images_in(m) if m.is_dir() else [m] if is_image_name(m) and m.is_file() else []
            if not found:
                problems.append((item, "no image file matches this pattern"))
        paths += found
    seen: set[str] = set()
    unique = []
    for p in paths:
        key = os.path.normpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, problems


# ----------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), best first
    error: str | None = None
    cam: Path | None = None


def _load_batch(
    paths: Sequence[Path], preprocess: dict[str, Any], pool
) -> list[tuple[Image.Image, torch.Tensor] | str]:
    def load(path: Path):
        try:
            image = read_image(path)
        except SemodelError as e:
            return str(e)
        return image, preprocess_image(image, preprocess)

    return list(pool.map(load, paths)) if pool is not None else [load(p) for p in paths]


def _cam_name(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    name = f"{stem}_cam.png"
    while name in used:
        n += 1
        name = f"{stem}-{n}_cam.png"
    used.add(name)
    return name


@torch.inference_mode()
def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch)


def _predict_loaded(
    classifier: Classifier, chunk: list[Path], loaded: list, topk: int, cam_dir: Path | None, used: set[str]
) -> list[Prediction]:
    results = [Prediction(p) for p in chunk]
    ok = [i for i, item in enumerate(loaded) if not isinstance(item, str)]
    for i, item in enumerate(loaded):
        if isinstance(item, str):
            results[i].error = item
    if not ok:
        return results
    x = torch.stack([loaded[i][1] for i in ok]).to(classifier.device)
    if cam_dir is not None:
        from semodel.gradcam import grad_cam, save_overlay

        logits, cams, _ = grad_cam(classifier.model, x)
    else:
        logits = _logits(classifier.model, x)
    values, indices = logits.float().softmax(1).cpu().topk(topk, dim=1)
    for row, i in enumerate(ok):
        pairs = zip(values[row], indices[row], strict=True)
        results[i].top = [(classifier.classes[int(c)], float(v)) for v, c in pairs]
        if cam_dir is not None:
            results[i].cam = save_overlay(
                loaded[i][0], cams[row].cpu(), classifier.preprocess, cam_dir / _cam_name(chunk[i], used)
            )
    return results


def predict_batches(
    classifier: Classifier,
    paths: Sequence[Path],
    topk: int,
    batch_size: int = 32,
    cam_dir: Path | None = None,
) -> Iterator[list[Prediction]]:
    """Top-k (class, probability) per image, one list per batch of ``batch_size``, in ``paths`` order;
    unreadable files get ``error``.

    Images are decoded in a small thread pool (PIL releases the GIL). With ``cam_dir``, a Grad-CAM
    overlay for the predicted class is written per image.
    """
    used_names: set[str] = set()
    if cam_dir is not None:
        cam_dir.mkdir(parents=True, exist_ok=True)
    pool = None
    if len(paths) > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
    try:
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            loaded = _load_batch(chunk, classifier.preprocess, pool)
            yield _predict_loaded(classifier, chunk, loaded, topk, cam_dir, used_names)
    finally:
        if pool is not None:
            pool.shutdown()


def predict_images(
    classifier: Classifier,
    paths: Sequence[Path],
    topk: int,
    batch_size: int = 32,
    cam_dir: Path | None = None,
) -> list[Prediction]:
    """``predict_batches``, all in one list."""
    return [p for batch in predict_batches(classifier, paths, topk, batch_size, cam_dir) for p in batch]


# ----------------------------------------------------------------------------- output


def columns(topk: int) -> list[str]:
    cols = ["path"]
    for k in range(1, topk + 1):
        cols += [f"top{k}", f"prob{k}"]
    return cols


def format_table(results: Sequence[Prediction], topk: int) -> str:
    rows = [["image"] + columns(topk)[1:]]
    for r in results:
        if r.error is None:
            row = [str(r.path)]
            for name, p in r.top:
                row += [name, f"{p:.4f}"]
            rows.append(row)
    if len(rows) == 1:
        return ""
    # path and class names to the left, probabilities (even columns) to the right
    return "\n".join(align(rows, right=lambda i: i > 0 and i % 2 == 0)) + "\n"


def format_json(results: Sequence[Prediction]) -> str:
    items = []
    for r in results:
        if r.error is not None:
            continue
        item: dict[str, Any] = {
            "path": str(r.path),
            "predictions": [{"class": c, "prob": round(p, 6)} for c, p in r.top],
        }
        if r.cam is not None:
            item["cam"] = str(r.cam)
        items.append(item)
    return json.dumps(items, indent=2) + "\n"


def format_csv(results: Sequence[Prediction], topk: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns(topk))
    for r in results:
        if r.error is None:
            w.writerow([str(r.path)] + [v for c, p in r.top for v in (c, f"{p:.6f}")])
    return buf.getvalue()


# ----------------------------------------------------------------------------- command


@dataclass
class PredictOptions:
    """``semodel predict``'s options besides the inputs and the checkpoint."""

    topk: int | None = None  # default: min(3, classes)
    fmt: str = "table"
    batch_size: int = 32
    device: str = "auto"
    cam_dir: Path | None = None
    use_ema: bool = False


def predict_from_cli(inputs: list[str], checkpoint: Path | None, options: PredictOptions) -> int:
    """Run ``semodel predict``; returns the exit code (0, or 1 when some image failed)."""
    o = options
    if o.fmt not in FORMATS:
        raise SemodelError(f"--format {o.fmt!r}: use one of {', '.join(FORMATS)}")
    if o.batch_size < 1:
        raise SemodelError(f"--batch-size {o.batch_size}: must be at least 1")
    if checkpoint is None:
        checkpoint = newest_best_checkpoint()
        say(f"using checkpoint {checkpoint} (the newest best.pt under runs/)")
    classifier = Classifier.load(checkpoint, o.device, o.use_ema)
    topk = min(3, len(classifier.classes)) if o.topk is None else o.topk
    if not 1 <= topk <= len(classifier.classes):
        raise SemodelError(
            f"--topk {topk}: must be between 1 and {len(classifier.classes)} (the checkpoint's classes)"
        )
    paths, problems = collect_inputs(inputs)
    for item, reason in problems:
        say(f"error: {item}: {reason}")
    results = run_with_progress(classifier, paths, topk, o)
    failed = len(problems) + sum(r.error is not None for r in results)
    if o.fmt == "json":
        sys.stdout.write(format_json(results))
    elif o.fmt == "csv":
        sys.stdout.write(format_csv(results, topk))
    else:
        sys.stdout.write(format_table(results, topk))
    done = sum(r.error is None for r in results)
    if o.cam_dir is not None and done:
        say(f"wrote {done} Grad-CAM overlay(s) to {o.cam_dir}/")
    if failed:
        say(f"{failed} input(s) failed, {done} image(s) predicted")
        return 1
    if not paths:
        raise SemodelError("no image to predict")
    return 0


def run_with_progress(
    classifier: Classifier, paths: list[Path], topk: int, o: PredictOptions
) -> list[Prediction]:
    """Predictions for ``paths``; a failed image is reported on stderr as its batch finishes."""
    bar = None
    if len(paths) > o.batch_size and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="img", file=sys.stderr, desc="predict")
    results: list[Prediction] = []
    try:
        for batch in predict_batches(classifier, paths, topk, o.batch_size, o.cam_dir):
            for p in batch:
                if p.error is not None:
                    say(f"error: {p.path}: {p.error}")
            results += batch
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return results
