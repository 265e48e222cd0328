"""``semodel predict``: top-k classes for image files, folders and glob patterns.

Cold start matters here (one image, on a CPU), so this module imports only torch, PIL and the
model code: no torchvision (its import pulls in torch._dynamo, about 2 s), no torchmetrics, no
matplotlib (only with ``--cam``), no pydantic. ``preprocess_image`` therefore re-implements the
checkpoint's evaluation transform (``semodel.data.eval_transform``) with plain torch calls; a test
checks that both give the same tensor.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from semodel.data import IMAGE_EXTENSIONS, load_rgb
from semodel.errors import SemodelError

FORMATS = ("table", "json", "csv")
GLOB_CHARS = set("*?[")


# ----------------------------------------------------------------------------- device, checkpoint


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """``auto`` (cuda, then mps, then cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SemodelError(f"{option} {name!r}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SemodelError(f"{option} {name!r}: CUDA is not available here; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SemodelError(
                f"{option} {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SemodelError(f"{option} {name!r}: MPS is not available here; use auto or cpu")
    return device


def newest_best_checkpoint(runs: Path = Path("runs")) -> Path:
    """The most recently written ``best.pt`` under ``runs`` (what predict uses without --checkpoint)."""
    found = [p for p in runs.glob("**/best.pt") if p.is_file()] if runs.is_dir() else []
    if not found:
        raise SemodelError(
            f"no --checkpoint given and no best.pt found under {runs}/; pass --checkpoint FILE"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def open_checkpoint(path: Path) -> dict[str, Any]:
    """``load_checkpoint`` plus two guards for files that are not checkpoints at all.

    A file that is not a zip archive (every ``torch.save`` since PyTorch 1.6 is one) is "not a
    checkpoint" rather than "refused: could run code"; and an unexpected error from the unpickler
    (a text file raises IndexError there) still becomes one line.
    """
    import zipfile

    from semodel.checkpoint import load_checkpoint

    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):
        reason = "not a PyTorch zip archive: another kind of file, or truncated"
        raise SemodelError(f"{path}: not a readable checkpoint ({reason})")
    try:
        return load_checkpoint(path)
    except SemodelError:
        raise
    except Exception as e:  # any failure to read the file is about the file, not a bug here
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise SemodelError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None


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


# ----------------------------------------------------------------------------- preprocessing


def _uint8_resize_is_native() -> bool:
    """Whether torchvision resizes uint8 images directly (it does on AVX2/AVX512/ARM CPUs)."""
    import platform

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's ``Resize(int)``: the shorter side becomes ``short``, the longer one is truncated."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner of torchvision's ``CenterCrop(size)`` (the image is at least ``size``)."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def preprocess_image(image: Image.Image, preprocess: dict[str, Any]) -> torch.Tensor:
    """The checkpoint's evaluation transform without torchvision: 3 x size x size float32.

    Same steps and numerics as ``semodel.data.eval_transform`` (torchvision v2): uint8 tensor,
    antialiased bilinear resize of the shorter side, center crop, scale to [0, 1], normalize.
    """
    if preprocess.get("interpolation", "bilinear") != "bilinear":
        raise SemodelError(
            f"checkpoint preprocessing uses {preprocess['interpolation']!r}; only bilinear is supported"
        )
    import numpy as np

    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # CHW view of HWC memory
    _, h, w = x.shape
    new_h, new_w = resized_size(h, w, int(preprocess["resize"]))
    if (new_h, new_w) != (h, w):
        batch = x.unsqueeze(0)
        native = _uint8_resize_is_native()
        if batch.is_contiguous(memory_format=torch.channels_last):
            # Keep the output channels-last, as torchvision does (pytorch/pytorch#68430).
            batch = batch.as_strided((1, 3, h, w), (x.numel(), *batch.stride()[1:]))
        if not native:
            batch = batch.float()
        batch = torch.nn.functional.interpolate(
            batch, size=[new_h, new_w], mode="bilinear", align_corners=False, antialias=True
        )
        if not native:
            batch = batch.round_().to(torch.uint8)
        x = batch[0]
        h, w = new_h, new_w
    size = int(preprocess["image_size"])
    top, left = crop_box(h, w, size)
    x = x[:, top : top + size, left : left + size]
    x = x.to(torch.float32).mul_(1.0 / 255)
    mean = torch.as_tensor(preprocess["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(preprocess["std"], dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def read_image(path: Path) -> Image.Image:
    """``load_rgb`` with the reason a file cannot be used as one short SemodelError."""
    try:
        return load_rgb(path)
    except FileNotFoundError:
        reason = "file not found"
    except IsADirectoryError:
        reason = "is a folder"
    except PermissionError:
        reason = "permission denied"
    except UnidentifiedImageError:
        reason = "not an image (unknown file format)"
    except Image.DecompressionBombError:
        reason = "too many pixels (decompression bomb guard)"
    except (OSError, SyntaxError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = f"corrupt image ({first[:100]})"
    raise SemodelError(reason)


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


def predict_images(
    model: torch.nn.Module,
    classes: list[str],
    preprocess: dict[str, Any],
    paths: Sequence[Path],
    device: torch.device,
    topk: int,
    batch_size: int = 32,
    cam_dir: Path | None = None,
    progress: bool = False,
    on_error: Callable[[Prediction], None] | None = None,
) -> list[Prediction]:
    """Top-k (class, probability) per image, in ``paths`` order; unreadable files get ``error``.

    Images are decoded in a small thread pool (PIL releases the GIL) and run in batches of
    ``batch_size``. With ``cam_dir``, a Grad-CAM overlay for the predicted class is written per image.
    """
    results: list[Prediction] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="img", file=sys.stderr, desc="predict")
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
            loaded = _load_batch(chunk, preprocess, pool)
            ok = [i for i, item in enumerate(loaded) if not isinstance(item, str)]
            batch_results = [Prediction(p) for p in chunk]
            for i, item in enumerate(loaded):
                if isinstance(item, str):
                    batch_results[i].error = item
                    if on_error:
                        on_error(batch_results[i])
            if ok:
                x = torch.stack([loaded[i][1] for i in ok]).to(device)
                if cam_dir is not None:
                    from semodel.gradcam import grad_cam, save_overlay

                    logits, cams, _ = grad_cam(model, x)
                else:
                    logits = _logits(model, x)
                probs = logits.float().softmax(1).cpu()
                values, indices = probs.topk(topk, dim=1)
                for row, i in enumerate(ok):
                    batch_results[i].top = [
                        (classes[int(c)], float(v)) for v, c in zip(values[row], indices[row], strict=True)
                    ]
                    if cam_dir is not None:
                        out = cam_dir / _cam_name(chunk[i], used_names)
                        save_overlay(loaded[i][0], cams[row].cpu(), preprocess, out)
                        batch_results[i].cam = out
            results += batch_results
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if pool is not None:
            pool.shutdown()
        if bar is not None:
            bar.close()
    return results


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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        # path and class names to the left, probabilities (even columns) to the right
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.rjust(w) if i and i % 2 == 0 else c.ljust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


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


def predict_from_cli(
    inputs: list[str],
    checkpoint: Path | None,
    topk: int | None,
    fmt: str,
    batch_size: int,
    device_name: str,
    cam_dir: Path | None,
    use_ema: bool,
) -> int:
    """Run ``semodel predict``; returns the exit code (0, or 1 when some image failed)."""
    from semodel.checkpoint import build_from_checkpoint

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if fmt not in FORMATS:
        raise SemodelError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise SemodelError(f"--batch-size {batch_size}: must be at least 1")
    if checkpoint is None:
        checkpoint = newest_best_checkpoint()
        say(f"using checkpoint {checkpoint} (the newest best.pt under runs/)")
    state = open_checkpoint(checkpoint)
    classes = list(state["classes"])
    if topk is None:
        topk = min(3, len(classes))
    if not 1 <= topk <= len(classes):
        raise SemodelError(f"--topk {topk}: must be between 1 and {len(classes)} (the checkpoint's classes)")
    device = resolve_device(device_name)
    model = build_from_checkpoint(state, use_ema=use_ema, source=str(checkpoint)).to(device)

    paths, problems = collect_inputs(inputs)
    for item, reason in problems:
        say(f"error: {item}: {reason}")
    failed = len(problems)

    def report(p: Prediction) -> None:
        nonlocal failed
        failed += 1
        say(f"error: {p.path}: {p.error}")

    show_bar = len(paths) > batch_size and sys.stderr.isatty()
    results = predict_images(
        model, classes, state["preprocess"], paths, device, topk, batch_size, cam_dir, show_bar, report
    )
    if fmt == "json":
        sys.stdout.write(format_json(results))
    elif fmt == "csv":
        sys.stdout.write(format_csv(results, topk))
    else:
        sys.stdout.write(format_table(results, topk))
    done = sum(r.error is None for r in results)
    if cam_dir is not None and done:
        say(f"wrote {done} Grad-CAM overlay(s) to {cam_dir}/")
    if failed:
        say(f"{failed} input(s) failed, {done} image(s) predicted")
        return 1
    if not paths:
        raise SemodelError("no image to predict")
    return 0
