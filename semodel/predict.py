"""``semodel predict``: top-k classes for image files, folders and glob patterns.

Cold start matters here (one image, on a CPU), so this module imports only torch, PIL and the
model code: no torchvision (its import pulls in torch._dynamo, about 2 s), no torchmetrics, no
matplotlib (only with ``--cam``), no pydantic. Images are prepared by ``semodel.preprocess``, which
reproduces the checkpoint's evaluation transform with plain torch calls.
"""

from __future__ import annotations

import csv
import fnmatch
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

from semodel.checkpoint import build_from_checkpoint, load_models, weights_label
from semodel.data import IMAGE_EXTENSIONS, is_image_name, list_images, read_image
from semodel.errors import SemodelError
from semodel.preprocess import preprocess_image
from semodel.runlog import say
from semodel.runtime import deferred_interrupt, resolve_device
from semodel.tables import align

FORMATS = ("table", "json", "csv")
GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------- the model


class Classifier:
    """A checkpoint's model (or a cross-validation's fold models) ready to predict: in eval mode on
    ``device``, with the classes and preprocessing. ``probs`` averages the models' probabilities.

    ``weights`` says which weights for the user (``semodel.checkpoint.weights_label``);
    ``temperatures`` (``calibrate``) divide each model's logits; ``threshold`` (``use_threshold``) is
    the p(class 1) from which two-class decisions go to class 1; ``states``: (path, checkpoint) pairs.
    """

    @classmethod
    def load(cls, checkpoint: Path, device: str = "auto", use_ema: bool | None = None) -> Classifier:
        """``checkpoint``: a file, or a cross-validation folder (the ensemble of its folds' best.pt)."""
        states = load_models(checkpoint)
        dev = resolve_device(device)
        models = [build_from_checkpoint(s, use_ema=use_ema, source=str(path)).to(dev) for path, s in states]
        state = states[0][1]
        weights = weights_label(state, use_ema) + (
            f"; mean of {len(states)} folds" if len(states) > 1 else ""
        )
        return cls(models, list(state["classes"]), state["preprocess"], dev, weights, states=states)

    def __init__(
        self,
        models: list[torch.nn.Module],
        classes: list[str],
        preprocess: dict[str, Any],
        device: torch.device,
        weights: str = "model",
        states: list[tuple[Path, dict[str, Any]]] | None = None,
    ) -> None:
        self.models, self.classes, self.preprocess, self.device = models, classes, preprocess, device
        self.weights, self.states = weights, states or []
        self.temperatures: list[float] | None = None
        self.threshold: float | None = None

    @property
    def model(self) -> torch.nn.Module:
        if len(self.models) != 1:
            raise SemodelError("--cam explains one model; a cross-validation folder holds one per fold")
        return self.models[0]

    def calibrate(self) -> None:
        """Divide each model's logits by the temperature its run fitted on the validation split."""
        temperatures = [(s.get("calibration") or {}).get("temperature") for _, s in self.states]
        missing = [str(path) for (path, _), t in zip(self.states, temperatures, strict=True) if t is None]
        if missing:
            raise SemodelError(
                f"--calibrated: {missing[0]} has no fitted temperature (train again to get one)"
            )
        self.temperatures = temperatures

    def use_threshold(self, threshold: str) -> None:
        """``--threshold val`` (the run's, chosen on its validation split) or a probability."""
        if len(self.classes) != 2:
            raise SemodelError(
                f"--threshold: a threshold decides between two classes; this model has {len(self.classes)}"
            )
        if threshold == "val":
            if len(self.states) != 1:
                raise SemodelError(
                    "--threshold val: the folds of a cross-validation chose a threshold each; give a number"
                )
            path, state = self.states[0]
            value = (state.get("calibration") or {}).get("threshold")
            if value is None:
                raise SemodelError(
                    f"--threshold val: {path} has no stored threshold (train again to get one)"
                )
            self.threshold = float(value)
            return
        try:
            self.threshold = float(threshold)
        except ValueError:
            raise SemodelError(f"--threshold {threshold!r}: 'val' or a probability such as 0.3") from None
        if not 0 < self.threshold < 1:
            raise SemodelError(f"--threshold {threshold}: must be between 0 and 1")

    @torch.inference_mode()
    def probs(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Mean class probabilities of the models for ``x`` (``logits``: model 0's, already computed)."""
        out = []
        for i, model in enumerate(self.models):
            z = (logits if i == 0 and logits is not None else model(x)).float()
            out.append((z / self.temperatures[i] if self.temperatures else z).softmax(1))
        return torch.stack(out).mean(0).cpu()

    def decide(self, probs: torch.Tensor) -> list[str] | None:
        """The class chosen at the threshold, per row (None without a threshold)."""
        if self.threshold is None:
            return None
        return [self.classes[int(p1 >= self.threshold)] for p1 in probs[:, 1].tolist()]


def newest_best_checkpoint(runs: Path = Path("runs")) -> Path:
    """The most recently written ``best.pt`` under ``runs`` (what predict uses without --checkpoint)."""
    found = [p for p in runs.glob("**/best.pt") if p.is_file()] if runs.is_dir() else []
    if not found:
        raise SemodelError(
            f"no --checkpoint given and no best.pt found under {runs}/; pass --checkpoint FILE"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


# ----------------------------------------------------------------------------- inputs


def _matches(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether path components ``parts`` match glob components ``pattern`` (``**``: any number)."""
    if not pattern:
        return not parts
    head, tail = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(tail, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _matches(tail, parts[1:])


def expand_pattern(pattern: str) -> list[Path]:
    """The files and folders a glob pattern names, in sorted order.

    With ``**`` (any number of folders) the candidates come from ``list_images``, the scan that
    train and eval use: linked folders are followed, loops are not, hidden names never match.
    (``glob``'s own ``**`` runs for ever in a link loop; ``pathlib``'s does not enter linked folders.)
    """
    parts = Path(pattern).parts
    if "**" not in parts:
        return sorted(Path(match) for match in glob.glob(pattern))
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    base = Path(*parts[:fixed]) if fixed else Path()
    if not base.is_dir():
        return []
    return [p for p in list_images(base).images if _matches(parts[fixed:], p.relative_to(base).parts)]


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
            found = list_images(p).images
            if not found:
                problems.append(
                    (item, f"no image files in this folder ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
                )
        elif p.exists() or not GLOB_CHARS & set(item):
            found = [p]  # a missing file is reported when it is read, in input order
        else:
            found = []
            for m in expand_pattern(os.path.expanduser(item)):
                found += (
                    list_images(m).images
                    if m.is_dir()
                    else [m]
                    if is_image_name(m.name) and m.is_file()
                    else []
                )
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
    decision: str | None = None  # the class chosen at --threshold


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
    logits = None
    if cam_dir is not None:
        from semodel.gradcam import grad_cam, save_overlay

        logits, cams, _ = grad_cam(classifier.model, x)
    probs = classifier.probs(x, logits)
    values, indices = probs.topk(topk, dim=1)
    decisions = classifier.decide(probs)
    for row, i in enumerate(ok):
        pairs = zip(values[row], indices[row], strict=True)
        results[i].top = [(classifier.classes[int(c)], float(v)) for v, c in pairs]
        results[i].decision = decisions[row] if decisions else None
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
        # An overlay never takes the name of an input image in the same folder (no command
        # writes over its own input).
        used_names = {p.name for p in paths if p.parent.resolve() == cam_dir.resolve()}
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


class RowWriter:
    """Predictions to ``out`` (stdout) batch by batch, as table, JSON or CSV: rows appear as their
    batch finishes, and a Ctrl-C keeps what was written (the JSON list is closed even then).

    The table's column widths come from what is known before the first batch (the input paths
    and the class names), so that rows can be printed before the last one is known.
    """

    def __init__(
        self, fmt: str, topk: int, classes: list[str], paths: Sequence[Path], decision: bool = False, out=None
    ) -> None:
        self.fmt, self.topk, self.out = fmt, topk, out or sys.stdout
        self.columns = columns(topk) + (["decision"] if decision else [])
        self.started = False
        path_width = max([len("image"), *(len(str(p)) for p in paths)])
        class_width = max(len(c) for c in classes)
        self.widths = [path_width]
        for k in range(1, topk + 1):
            self.widths += [max(len(f"top{k}"), class_width), max(len(f"prob{k}"), len("0.0000"))]
        if decision:
            self.widths.append(max(len("decision"), class_width))

    def _line(self, cells: list[str]) -> str:
        # path and class names to the left, probabilities (even columns) to the right
        return align([cells], right=lambda i: i > 0 and i % 2 == 0, widths=self.widths)[0] + "\n"

    def _start(self) -> str:
        """The header (table, CSV) or the list's opening (JSON)."""
        if self.fmt == "table":
            return self._line(["image"] + self.columns[1:])
        if self.fmt == "csv":
            return ",".join(self.columns) + "\n"
        return "[\n"

    def write(self, batch: Sequence[Prediction]) -> None:
        done = [r for r in batch if r.error is None]
        if not done:
            return
        head = self._start() if not self.started else ",\n" if self.fmt == "json" else ""
        separator = ",\n" if self.fmt == "json" else ""
        text = head + separator.join(self._format(r) for r in done)
        with deferred_interrupt():
            self.out.write(text)
            self.out.flush()
            self.started = True

    def _format(self, r: Prediction) -> str:
        values = [v for c, p in r.top for v in (c, f"{p:.4f}" if self.fmt == "table" else f"{p:.6f}")]
        values += [r.decision] if self.columns[-1] == "decision" else []
        if self.fmt == "table":
            return self._line([str(r.path), *values])
        if self.fmt == "csv":
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow([str(r.path), *values])
            return buf.getvalue()
        item: dict[str, Any] = {
            "path": str(r.path),
            "predictions": [{"class": c, "prob": round(p, 6)} for c, p in r.top],
        }
        if r.cam is not None:
            item["cam"] = str(r.cam)
        if r.decision is not None:
            item["decision"] = r.decision
        return "\n".join("  " + line for line in json.dumps(item, indent=2).splitlines())

    def finish(self) -> None:
        with deferred_interrupt():
            if self.fmt == "json":
                self.out.write("\n]\n" if self.started else "[]\n")
            self.out.flush()


# ----------------------------------------------------------------------------- command


@dataclass
class PredictOptions:
    """``semodel predict``'s options besides the inputs and the checkpoint."""

    topk: int | None = None  # default: min(3, classes)
    fmt: str = "table"
    batch_size: int = 32
    device: str = "auto"
    cam_dir: Path | None = None
    use_ema: bool | None = None  # None: the weights the run selected
    threshold: str | None = None  # two classes: "val" (the run's, chosen on val) or a probability
    calibrated: bool = False  # divide the logits by the temperature fitted on val


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
    if o.calibrated:
        classifier.calibrate()
    if o.threshold is not None:
        classifier.use_threshold(o.threshold)
    if classifier.weights != "model":  # the checkpoint has EMA weights: say which ones predict
        say(f"weights: {classifier.weights}")
    topk = min(3, len(classifier.classes)) if o.topk is None else o.topk
    if not 1 <= topk <= len(classifier.classes):
        raise SemodelError(
            f"--topk {topk}: must be between 1 and {len(classifier.classes)} (the checkpoint's classes)"
        )
    paths, problems = collect_inputs(inputs)
    for item, reason in problems:
        say(f"error: {item}: {reason}")
    writer = RowWriter(o.fmt, topk, classifier.classes, paths, decision=classifier.threshold is not None)
    try:
        results = run_with_progress(classifier, paths, topk, o, writer)
    finally:
        writer.finish()  # also on Ctrl-C: the rows of the finished batches stay printed
    failed = len(problems) + sum(r.error is not None for r in results)
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
    classifier: Classifier, paths: list[Path], topk: int, o: PredictOptions, writer: RowWriter
) -> list[Prediction]:
    """Predictions for ``paths``, written as each batch finishes; a failed image is reported on stderr."""
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
            writer.write(batch)
            results += batch
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return results
